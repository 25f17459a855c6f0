"""Where the shipped models live: `nanopali.load()` and every CLI command without --model use the default one.

The default is a small PaliGemma trained on nanopali's toy shapes world (nanopali/world/); it knows only
that world. The environment variable NANOPALI_DEFAULT_MODEL, when set, names another directory to use instead.
The shipped models also have names that `--model` / `nanopali.load(path)` take (`SHIPPED`): "default", and
"moe" for the mixture-of-experts model of the same world; a directory of that name, where one exists, wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanopali.errors import MissingFileError

DEFAULT_MODEL_DIR = Path(__file__).parent / "world" / "default_model"  # a data folder: nothing is imported from world/
MOE_MODEL_DIR = Path(__file__).parent / "world" / "moe_model"
SHIPPED = {"default": DEFAULT_MODEL_DIR, "moe": MOE_MODEL_DIR}
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
    """The checkpoint directory `path` names: None is the default model (default_model_dir), a shipped model's
    name (SHIPPED) its folder unless a path of that name exists, anything else the path itself."""
    if path is None:
        return default_model_dir()
    if str(path) in SHIPPED and not Path(path).exists():
        return SHIPPED[str(path)]
    return Path(path)
