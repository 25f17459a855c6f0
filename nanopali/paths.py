"""Where the shipped default models live: `nanopali.load()` / `nanopali.load_contrastive()` and every CLI command
without --model use them.

The defaults are small models trained on nanopali's toy shapes world (nanopali/world/): a PaliGemma
(default_model/) and a contrastive SigLIP (default_siglip/); they know only that world. The environment variables
NANOPALI_DEFAULT_MODEL / NANOPALI_DEFAULT_SIGLIP, when set, name other directories to use instead.
`--model` / `nanopali.load(path)` also take the names in NAMED: "moe", the folder a mixture-of-experts model of
the same world would ship in had one beaten the dense model (scripts/make_moe_model.py makes one; none ships:
BENCHMARKS.md says why); a directory of that name, where one exists, wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanopali.errors import MissingFileError

WORLD = Path(__file__).parent / "world"  # data folders: nothing is imported from world/
DEFAULT_MODEL_DIR = WORLD / "default_model"
DEFAULT_SIGLIP_DIR = WORLD / "default_siglip"
MOE_MODEL_DIR = WORLD / "moe_model"
NAMED = {"moe": MOE_MODEL_DIR}  # models that --model names, where they ship
ENV_VAR = "NANOPALI_DEFAULT_MODEL"
SIGLIP_ENV_VAR = "NANOPALI_DEFAULT_SIGLIP"


def default_model_dir() -> Path:
    """$NANOPALI_DEFAULT_MODEL if set, else the packaged default_model/; an error if it holds no config.json."""
    return _default(DEFAULT_MODEL_DIR, ENV_VAR)


def default_siglip_dir() -> Path:
    """$NANOPALI_DEFAULT_SIGLIP if set, else the packaged default_siglip/; an error if it holds no config.json."""
    return _default(DEFAULT_SIGLIP_DIR, SIGLIP_ENV_VAR)


def _default(folder: Path, env_var: str) -> Path:
    override = os.environ.get(env_var)
    path = Path(override) if override else folder
    if (path / "config.json").is_file():
        return path
    if override:
        raise MissingFileError(f"{env_var}={override} is not a checkpoint directory (no config.json there)")
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
                               f"--work runs/moe` and then `--stage ship --pair upcycle`, or pass a checkpoint "
                               f"directory")
    return NAMED[name]
