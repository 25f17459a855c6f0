"""Training checkpoints, written atomically and resumed exactly.

    out/checkpoint-000100/   config.json, safetensors (Hugging Face layout: PaliGemma.from_pretrained
                             and transformers load it), tokenizer + preprocessor files, and
                             trainer_state.pt (optimizer, scheduler, RNG states, step, data position)
    out/latest               the name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place; `latest` is replaced
atomically afterwards. A run killed at any moment therefore leaves `latest` pointing at a complete
checkpoint (leftover temporary directories are removed on the next start).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
PREFIX = "checkpoint-"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: Path, step: int, write_model, trainer_state: dict, keep: int = 3) -> Path:
    """Write checkpoint `step`: write_model(dir) writes the model files, trainer_state goes to STATE_FILE."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{PREFIX}{step:06d}"
    if (final / STATE_FILE).is_file():
        return final  # already saved at this step (e.g. a signal right after a periodic save)
    tmp = out / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    pointer = out / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, out / LATEST)
    for old in sorted(out.glob(f"{PREFIX}*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = out / LATEST
    if not pointer.is_file():
        return None
    path = out / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def remove_partial(out: Path) -> None:
    """Delete temporary directories left by a run that was killed while writing."""
    for tmp in out.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
