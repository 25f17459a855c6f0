"""Run a script in several CPU processes under torchrun (gloo), for the multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_torchrun(tmp_path: Path, script: Path, *args: str, processes: int = 2) -> None:
    """`script args...` in `processes` processes, one thread each; fail the test with torchrun's stderr if it fails.
    TMPDIR is tmp_path, so torchrun's own log folders (torchelastic_*) go with the test's files, not into /tmp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone", str(script),
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stderr[-6000:]}")
