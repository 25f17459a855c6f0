"""Training checkpoints, written atomically and resumed exactly.

    out/checkpoint-000100/   config.json, safetensors (Hugging Face layout: PaliGemma.from_pretrained
                             and transformers load it), tokenizer + preprocessor files, and
                             trainer_state.pt (optimizer, scheduler, RNG states, step, data position)
    out/latest               the name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place; `latest` is replaced
atomically afterwards, and only then are old checkpoints pruned (never the one `latest` names). A run
killed at any moment therefore leaves `latest` naming a complete checkpoint (leftover temporary
directories are removed on the next start). A checkpoint folder that already exists at the step being
saved (left by a continuation that was abandoned, e.g. killed before `latest` moved to it) is replaced,
never kept in place of the new weights.

The files nanopali writes into a run directory are `latest`, the checkpoint-NNNNNN folders, metrics.jsonl
and loss.png (run_files); `clear_run` removes exactly those (and temporary leftovers), nothing else.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from nanopali.errors import MissingFileError

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
PREFIX = "checkpoint-"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)")


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


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder name (checkpoint-000123 -> 123), None for any other name."""
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoint folders in a run directory, by step (complete or not)."""
    found = [(step_of(p), p) for p in out.glob(f"{PREFIX}*") if p.is_dir()] if out.is_dir() else []
    return sorted((s, p) for s, p in found if s is not None)


def save(out: Path, step: int, write_model, trainer_state: dict, keep: int = 3) -> Path:
    """Write checkpoint `step`: write_model(dir) writes the model files, trainer_state goes to STATE_FILE.

    Keeps the new checkpoint and the `keep - 1` newest older ones (keep <= 0: all); a folder of a later step
    (from an abandoned continuation) is removed with the old ones. An existing folder at `step` is replaced.
    """
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{PREFIX}{step:06d}"
    tmp = out / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    old = None
    if final.exists():  # never keep another run's (or an abandoned continuation's) weights under this name
        old = out / f".tmp-{final.name}-replaced-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _write_latest(out, final.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        older = [p for s, p in checkpoints(out) if s < step]
        doomed = older[:-keep + 1] if keep > 1 else older
        doomed += [p for s, p in checkpoints(out) if s > step]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _write_latest(out: Path, name: str) -> None:
    """Point `latest` at `name`, atomically (a temporary file, flushed, renamed over the old one)."""
    pointer = out / f".{LATEST}.tmp"
    with pointer.open("w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, out / LATEST)


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory: the one `latest` names, or, when there is no
    `latest` file (a run killed between writing its first checkpoint and pointing `latest` at it), the
    newest complete checkpoint folder; None when there is none."""
    pointer = out / LATEST
    if not pointer.is_file():
        complete = [p for _, p in checkpoints(out) if (p / STATE_FILE).is_file()]
        return complete[-1] if complete else None
    name = pointer.read_text().strip()
    path = out / name
    if step_of(path) is None or not (path / STATE_FILE).is_file():
        raise MissingFileError(f"{pointer} names {name!r}, which is not a complete checkpoint in {out} (was the run "
                               f"directory changed by hand?); write the name of a complete checkpoint folder into it, "
                               f"or start over with --overwrite")
    return path


def run_files(out: Path) -> list[str]:
    """The names of what nanopali writes into a run directory that are there: checkpoints, latest, metrics, plot."""
    if not out.is_dir():
        return []
    names = [p.name for _, p in checkpoints(out)]
    return names + [n for n in (LATEST, METRICS, PLOT) if (out / n).exists()]


def clear_run(out: Path) -> None:
    """Delete what nanopali wrote into a run directory (`latest` first, so it never names a deleted checkpoint)."""
    for name in (LATEST, f".{LATEST}.tmp", METRICS, f".{METRICS}.tmp", PLOT):
        (out / name).unlink(missing_ok=True)
    for _, path in checkpoints(out):
        shutil.rmtree(path)
    remove_partial(out)


def remove_partial(out: Path) -> None:
    """Delete temporary directories left by a run that was killed while writing."""
    for tmp in out.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
