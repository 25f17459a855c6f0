"""Where the shipped models live: `nanopali.load()` and every CLI command without --model use the default one.

The default is a small PaliGemma trained on nanopali's toy shapes world (nanopali/world/); it knows only
that world. The environment variable NANOPALI_DEFAULT_MODEL, when set, names another directory to use instead.
`--model` / `nanopali.load(path)` also take the names in NAMED: "moe", the folder a mixture-of-experts model of
the same world would ship in had one beaten the dense model (scripts/make_moe_model.py makes one; none ships:
BENCHMARKS.md says why); a directory of that name, where one exists, wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanopali.errors import MissingFileError

DEFAULT_MODEL_DIR = Path(__file__).parent / "world" / "default_model"  # a data folder: nothing is imported from world/
MOE_MODEL_DIR = Path(__file__).parent / "world" / "moe_model"
NAMED = {"moe": MOE_MODEL_DIR}  # models that --model names, where they ship
ENV_VAR = "NANOPALI_DEFAULT_MODEL"


def default_model_dir() -> Path:
    """$NANOPALI_DEFAULT_MODEL if set, else the packaged default_model/; an error if it holds no config.json."""
    override = os.environ.get(ENV_VAR)
    path = Path(override) if override else DEFAULT_MODEL_DIR
    if (path / "config.json").is_file():
        return path
    if override:
        raise MissingFileError(f"{ENV_VAR}={override} is not a checkpoint directory (no config.json there)")
    raise MissingFileError(f"no default model at {path}: this nanopali was installed without it (e.g. from an "
                           f"sdist without its data files); pass a checkpoint directory (--model on the command line)")


def model_dir(path: str | Path | None) -> Path:
    """The checkpoint directory `path` names: None is the default model (default_model_dir), a name in NAMED its
    folder (an error when that model is not shipped) unless a path of that name exists, anything else the path."""
    if path is None:
        return default_model_dir()
    name = str(path)
    if name not in NAMED or Path(path).exists():
        return Path(path)
    if not (NAMED[name] / "config.json").is_file():
        raise MissingFileError(f"no {name!r} model ships with this nanopali (nothing at {NAMED[name]}; BENCHMARKS.md, "
                               f"'Mixture of experts', says why): make one with `python scripts/make_moe_model.py "
                               f"--work runs/moe` and then `--stage ship --pair upcycle`, or pass a checkpoint directory")
    return NAMED[name]
