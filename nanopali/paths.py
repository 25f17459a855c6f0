"""Where the shipped default model lives: `nanopali.load()` and every CLI command without --model use it.

The default is a small PaliGemma trained on nanopali's toy shapes world (nanopali/world/); it knows only
that world. The environment variable NANOPALI_DEFAULT_MODEL, when set, names another directory to use instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanopali.errors import MissingFileError

DEFAULT_MODEL_DIR = Path(__file__).parent / "world" / "default_model"  # a data folder: nothing is imported from world/
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
