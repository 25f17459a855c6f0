"""Where the shipped default models live: `nanopali.load()` / `nanopali.load_contrastive()` and every CLI command
without --model use them.

The defaults are small models trained on nanopali's toy shapes world (nanopali/world/): a PaliGemma
(default_model/) and a contrastive SigLIP (default_siglip/); they know only that world. The environment variables
NANOPALI_DEFAULT_MODEL / NANOPALI_DEFAULT_SIGLIP, when set, name other directories to use instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanopali.errors import MissingFileError

WORLD = Path(__file__).parent / "world"  # data folders: nothing is imported from world/
DEFAULT_MODEL_DIR = WORLD / "default_model"
DEFAULT_SIGLIP_DIR = WORLD / "default_siglip"
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
