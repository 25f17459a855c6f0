"""open_clip's `loss.py` (ClipLoss, SigLipLoss), the independent reference for the contrastive losses.

open_clip_torch is installed without its dependencies (`pip install --no-deps open_clip_torch==3.3.0`, as the README's
test command does): its package __init__ imports torchvision and timm, which do not install beside the CPU torch
wheel, but loss.py imports only torch. So the file is loaded on its own, by path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest


def open_clip_loss():
    """The open_clip.loss module, or skip the test with the reason when open_clip_torch is not installed."""
    try:
        path = importlib.metadata.distribution("open_clip_torch").locate_file("open_clip/loss.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch==3.3.0)")
    spec = importlib.util.spec_from_file_location("open_clip_loss", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
