"""Devices and dtypes the user names: checked once, before any file is read, with a message that says what works.

    resolve_device("cpu" | "cuda" | "cuda:1" | "mps" | "auto" | torch.device) -> torch.device
    resolve_dtype(torch.bfloat16 | "bfloat16" | "bf16" | "float32" | "fp32" | "float16" | "fp16" | ...) -> torch.dtype

A device that cannot be used here (`cuda` with no GPU visible to torch, `cuda:3` on a one-GPU machine, `mps`
off Apple silicon, a misspelt name) and a dtype that cannot hold weights (int8, bool, a misspelt name) are a
UsageError. "auto" is the first GPU when torch sees one, else the CPU. Weights are floating point: int8/int4
weights come from quantizing after loading (`quantize=`), never from `dtype=`.
This module imports nothing from the project but its errors.
"""

from __future__ import annotations

import torch

from nanopali.errors import UsageError

DEVICE_FORMS = "cpu, cuda, cuda:N, mps or auto"

# The floating dtypes weights can be loaded in, by every name a user is likely to type.
_DTYPE_NAMES = {
    torch.float32: ("float32", "fp32", "f32", "float"),
    torch.bfloat16: ("bfloat16", "bf16"),
    torch.float16: ("float16", "fp16", "f16", "half"),
    torch.float64: ("float64", "fp64", "f64", "double"),
}
DTYPES = {name: dtype for dtype, names in _DTYPE_NAMES.items() for name in names}


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """The torch.device `device` names, checked to be usable on this machine; else a UsageError saying why."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        text = device.strip().lower()
        if text == "auto":
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {device!r} is not a device; use {DEVICE_FORMS}") from None
    elif isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)
    elif not isinstance(device, torch.device):
        raise UsageError(f"device must be a string or a torch.device ({DEVICE_FORMS}), got a {type(device).__name__}")
    name = str(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: torch sees {count} CUDA GPU{'s' if count != 1 else ''} "
                             f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: the Apple MPS backend is not available here; use --device cpu")
        return device
    raise UsageError(f"--device {name}: nanopali runs on {DEVICE_FORMS}, not on {device.type!r}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The floating torch.dtype `dtype` names ("bfloat16", "bf16", torch.float16 …); else a UsageError."""
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
        raise UsageError(f"--dtype {dtype!r} is not a dtype nanopali loads weights in; use "
                         f"{', '.join(names[0] for names in _DTYPE_NAMES.values())}")
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype must be a torch.dtype or its name (e.g. torch.bfloat16 or 'bfloat16'), "
                         f"got a {type(dtype).__name__}")
    if dtype not in _DTYPE_NAMES:
        raise UsageError(f"dtype {dtype} cannot hold the weights: use torch.float32, torch.bfloat16 or torch.float16 "
                         "(for int8/int4 weights, load in a float dtype and pass quantize='int8' or 'int4')")
    return dtype
