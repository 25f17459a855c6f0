"""The fast decode-step matrix products for CPU inference: compiled fp32-accumulating matrix-vector kernels.

    y = linear(x, weight, scale=None)   # x (..., K) @ weight (N, K)ᵀ [· scale (N,)] -> (..., N) in x.dtype

Why. A decode step multiplies one row per sequence by every weight matrix, so it is bound by how
fast the weights stream from memory. On this project's 2-core Zen 4 machine torch's bf16 GEMV
(F.linear -> oneDNN) streams ~20 GB/s where the memory gives ~37 GB/s. Written as an elementwise
product and a row sum, `(x[:, None, :] * w.float()).sum(-1)`, inductor's CPU backend generates one
vectorised loop that reads each weight row once, converts it to fp32 in registers and accumulates:
~31-34 GB/s for bf16 weights, and the same loop on int8 weights (quantize.py) reads half the bytes,
with the per-channel scales applied to the N outputs. BENCHMARKS.md has the measurements.

Which path a product takes (only without autograd, on CPU, when the layer's `fast` flag is on):

    one row, rows of K <= MAX_K      the compiled loop (bf16, fp16 or int8 weights)
    one row, K > MAX_K               bf16: F.linear; int8: torch._weight_int8pack_mm
    2..MAX_ROWS rows                 bf16: F.linear; int8: torch._weight_int8pack_mm
    more rows (prefill)              bf16: F.linear; int8: a compiled dequantisation, then F.linear

int4 weights (quantize.py, group-wise) take `linear_int4`: torch._weight_int4pack_mm_for_cpu for up to
INT4_KERNEL_ROWS rows of bf16 activations (4 rows of other dtypes), else the weight is unpacked and
F.linear runs. For one row the kernel streams half a byte per weight; for a 268-row bf16 prefill it
computes at about half F.linear's rate (0.10 vs 0.05 s for 16384×2048), which still beats unpacking
first (0.2-0.3 s for that matrix, eager or compiled: torch's packed layout unpacks slowly); at 1500
rows unpacking wins (0.48 vs 0.59 s), and with fp32 activations the kernel is 75× slower than
unpacking at 2500 rows.

(For more than one row the loop re-reads each weight row per input row and loses to F.linear; for
K > MAX_K the fp32 x no longer stays in the L1 cache next to the streamed row, and the loop fell
to ~20 GB/s for the 2048×16384 down projection, where int8pack gives 27.)
Training, and everything with `fast` off (`enable(model, False)`, `from_pretrained(..., fast=False)`,
the CLI's `--no-fast`), takes plain F.linear.

The kernels are compiled on first use with dynamic shapes (a few seconds) and need a C++ compiler;
if compilation fails, a warning is printed and the plain path is used from then on.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

MAX_ROWS = 16   # int8 batches up to this many rows take _weight_int8pack_mm; more is a prefill
MAX_K = 4096    # longest row the compiled loop takes (see above)
HALF = (torch.bfloat16, torch.float16)
INT4_KERNEL_ROWS = 1024  # bf16 rows up to which torch's int4 kernel beats unpacking + F.linear (see above)


def _matvec(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x (M, K) · weight (N, K) of any dtype [· fp32 scale (N,)] -> (M, N) in dtype: one pass over the weight.

    x comes in fp32 (converted once, outside): converting it inside would redo it for every weight row.
    """
    y = (x[:, None, :] * weight[None].float()).sum(-1)                  # (M, N), accumulated in fp32
    return (y if scale is None else y * scale).to(dtype)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (N, K) and fp32 scale (N,) -> (N, K) in dtype, in one fused pass."""
    return (weight.float() * scale[:, None]).to(dtype)


def unpack_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """torch's CPU int4 packing (`torch._convert_weight_to_int4pack_for_cpu`, uint8 (N, K / 2)) -> uint8 (N, K) in 0..15.

    The layout, as torch 2.13 writes it: rows in blocks of 64, each block K runs of 32 bytes whose low
    nibbles are the block's rows 0..31 and high nibbles rows 32..63; the last N % 64 rows (a multiple of
    16) K runs of (N % 64) / 2 bytes, even rows in the low nibbles, odd rows in the high ones.
    quantize.py checks every packed matrix against this, so a changed layout fails loudly at load time.
    """
    flat = packed.reshape(-1)
    full, tail = N - N % 64, N % 64
    blocks = flat[: full * K // 2].view(full // 64, K, 32)                            # (N/64, K, 32)
    head = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(full, K)
    if not tail:
        return head
    runs = flat[full * K // 2:].view(K, tail // 2)                                    # (K, tail/2)
    rest = torch.stack([runs & 15, runs >> 4], dim=2).reshape(K, tail).t()            # (tail, K)
    return torch.cat([head, rest])


def _dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed int4 (N, K / 2) and (K / G, N, 2) scales and zeros -> (N, K) in dtype: w = (q - 8) · scale + zero."""
    groups, N, _ = scales_and_zeros.shape
    K = packed.numel() * 2 // N
    q = unpack_int4(packed, N, K).view(N, groups, K // groups).float() - 8             # (N, K/G, G)
    scale, zero = scales_and_zeros.float().permute(2, 1, 0)                           # (N, K/G) each
    return (q * scale[..., None] + zero[..., None]).view(N, K).to(dtype)


_compiled: dict[tuple, object] = {}  # (function, weight dtype) -> its compiled version
_broken = False  # set when compilation failed once; then the plain path is used


def _run(fn, *args):
    """Call the compiled `fn` (compiled once per weight dtype); None if compilation is unavailable."""
    global _broken
    key = (fn.__name__, args[1].dtype if fn is _matvec else args[0].dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[key](*args)
    except Exception as e:  # no C++ compiler, unsupported platform, ...
        _broken = True
        warnings.warn(f"nanopali.fast: compiling the decode kernel failed ({type(e).__name__}: {e}); "
                      "using F.linear from now on", RuntimeWarning, stacklevel=3)
        return None


def _kernel(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (M, K) -> (M, N) in x.dtype through the compiled _matvec (None if it cannot be compiled)."""
    # detach: a Parameter and a plain Tensor would compile twice
    return _run(_matvec, x.float(), weight.detach(), scale, x.dtype)


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes the compiled matrix-vector loop."""
    K = weight.shape[-1]
    return (_fast_context(x) and x.numel() == K and K <= MAX_K
            and (weight.dtype == torch.int8 or weight.dtype in HALF))


def _fast_context(x: torch.Tensor) -> bool:
    return not _broken and not torch.is_grad_enabled() and x.device.type == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, fast: bool = True) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ, times scale (N,) if given, in x.dtype; see the table in the module docstring."""
    *lead, K = x.shape
    N = weight.shape[0]
    rows = x.numel() // K
    if fast and uses_kernel(x, weight):
        y = _kernel(x.reshape(1, K), weight, scale)
        if y is not None:
            return y.view(*lead, N)
    int8 = weight.dtype == torch.int8
    if int8 and fast and _fast_context(x) and x.dtype in HALF + (torch.float32,) and hasattr(torch, "_weight_int8pack_mm"):
        if rows <= MAX_ROWS:
            return torch._weight_int8pack_mm(x.reshape(rows, K), weight, scale.to(x.dtype)).view(*lead, N)
        w = _run(_dequantize, weight, scale, x.dtype)
        if w is not None:
            return F.linear(x, w)
    if int8:  # the plain path: dequantize one matrix eagerly (a transient copy)
        return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None])
    return F.linear(x, weight) if scale is None else F.linear(x, weight) * scale.to(x.dtype)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """x (..., K) @ the int4 weight (N, K)ᵀ (quantize.Int4Linear's buffers) -> (..., N) in x.dtype."""
    *lead, K = x.shape
    groups, N, _ = scales_and_zeros.shape
    rows = x.numel() // K
    if fast and _fast_context(x) and rows <= (INT4_KERNEL_ROWS if x.dtype == torch.bfloat16 else 4):
        return torch._weight_int4pack_mm_for_cpu(x.reshape(-1, K), packed, K // groups,
                                                 scales_and_zeros.to(x.dtype)).view(*lead, N)
    return F.linear(x, _dequantize_int4(packed, scales_and_zeros, x.dtype))  # a transient copy


def enable(model: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Turn the fast paths on or off for every layer of `model` that has a `fast` flag (decoder linears and head)."""
    for module in model.modules():
        if hasattr(module, "fast"):
            module.fast = on
    return model
