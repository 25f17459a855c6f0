"""Fast CPU inference kernels: the decode step's matrix products, and fused elementwise ops for prefill.

    y = linear(x, weight, scale=None)   # x (..., K) @ weight (N, K)ᵀ [· scale (N,)] -> (..., N) in x.dtype
    y = gelu(x, up=None)                # gelu_tanh(x) [· up], fused (GeGLU / the SigLIP MLP)
    y = rms_norm(x, weight, eps)        # Gemma's x·rsqrt(mean(x²)+eps)·(1+w) in fp32, fused

Why. A decode step multiplies one row per sequence by every weight matrix, so it is bound by how
fast the weights stream from memory. On a 2-core AMD Zen 4 machine torch's bf16 GEMV (F.linear ->
oneDNN) streams ~20 GB/s where the memory gives ~37 GB/s. Written as an elementwise
product and a row sum, `(x[:, None, :] * w.float()).sum(-1)`, inductor's CPU backend generates one
vectorised loop that reads each weight row once, converts it to fp32 in registers and accumulates:
~31-34 GB/s for bf16 weights, and the same loop on int8 weights (quantize.py) reads half the bytes,
with the per-channel scales applied to the N outputs. BENCHMARKS.md has the measurements.

Which path a product takes (only without autograd, on CPU, when the layer's `fast` flag is on):

    one row                          the path in force (`using`, set per decode step by a StepChooser):
                                     "loop": the compiled loop for rows of K <= MAX_K, else as "library";
                                     "library" (the default outside decode steps): torch's kernel,
                                     bf16: F.linear, int8: torch._weight_int8pack_mm
    2..MAX_ROWS rows                 bf16: F.linear; int8: torch._weight_int8pack_mm
    more rows (prefill)              bf16: F.linear; int8: a compiled dequantisation into a reused
                                     buffer (see _scratch), then F.linear

Why measured. Which one-row product is faster depends on the processor, and the two machines this project
ran on disagree. On a 2-core AMD Zen 4 the loop streams 31-36 GB/s where F.linear gets ~20 (except for rows
longer than MAX_K, the 2048×16384 down projection: the fp32 x no longer fits the L1 cache beside the
streamed row; for int8 there int8pack gives 27 GB/s, the loop 7), and bf16 decode ran 1.6x faster with it.
On a 2-core Intel Xeon with AMX the library kernels stream as fast or faster and a decode step that uses
the loop ran ~8 % slower, although timing each product on its own had picked the loop for three of five
shapes: mixing the two kinds of kernel in one step costs more than either product shows alone
(BENCHMARKS.md). So the choice is made on whole decode steps: a StepChooser (one per model, decode.py)
runs its first steps alternately under each path, TRIALS timed steps each after an untimed first one
(which compiles the loop), and keeps the faster median for the rest of the process. `choose(path)` forces
one path everywhere (tests, benchmarks, debugging).

int4 weights (quantize.py, group-wise) take `linear_int4`: torch._weight_int4pack_mm_for_cpu for up to
INT4_KERNEL_ROWS rows of bf16 activations (4 rows of other dtypes), else the weight is unpacked and
F.linear runs. For one row the kernel streams half a byte per weight; for a 268-row bf16 prefill it
computes at about half F.linear's rate (0.10 vs 0.05 s for 16384×2048), which still beats unpacking
first (0.2-0.3 s for that matrix, eager or compiled: torch's packed layout unpacks slowly); at 1500
rows unpacking wins (0.48 vs 0.59 s), and with fp32 activations the kernel is 75× slower than
unpacking at 2500 rows.

(For more than one row the loop re-reads each weight row per input row and loses to F.linear.)
The elementwise ops. With matrix products on AMX (Intel Xeon; bf16 GEMMs at 2-3 TFLOP/s on 2 cores), a
3B prefill spent a fifth of its time in eager elementwise ops: the tanh-gelu alone 14 % (~4 ms per
268×16384 bf16 call), the GeGLU product, RMSNorm's fp32 pow/mean/mul/casts. Compiled by inductor, each
becomes one vectorised pass in fp32 that rounds once to the activation dtype (eager rounds after each op,
so results differ by about a unit in the last place); the tanh-gelu is written through a sigmoid, which
inductor vectorises better (`_gelu_tanh`). Only tensors of at least ELEMENTWISE_MIN elements
take them (a 3B prefill's RMSNorm input, 268×2048, and larger): for a decode step's single row an eager op is
as fast as a call into compiled code, and for a small model (the shipped default's 70×1024 GeGLU) the few
seconds that compiling costs each process would outweigh what it saves.

Training, and everything with `fast` off (`enable(model, False)`, `from_pretrained(..., fast=False)`,
the CLI's `--no-fast`), takes plain F.linear.

The kernels are compiled on first use with dynamic shapes (a few seconds) and need a C++ compiler;
if compilation fails, a warning is printed and the library kernels are used from then on.
"""

from __future__ import annotations

import statistics
import threading
import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

MAX_ROWS = 16   # int8 batches up to this many rows take _weight_int8pack_mm; more is a prefill
MAX_K = 4096    # longest row the compiled loop takes (see above)
TRIALS = 3      # timed decode steps of each one-row path before the faster one is kept
ELEMENTWISE_MIN = 1 << 19  # tensors smaller than this take the eager elementwise ops (see above)
MEASURE_MIN_PARAMS = 50_000_000  # smaller decoders take the library path without timing the loop (see StepChooser)
HALF = (torch.bfloat16, torch.float16)
INT4_KERNEL_ROWS = 1024  # bf16 rows up to which torch's int4 kernel beats unpacking + F.linear (see above)


def _matvec(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x (M, K) · weight (N, K) of any dtype [· fp32 scale (N,)] -> (M, N) in dtype: one pass over the weight.

    x comes in fp32 (converted once, outside): converting it inside would redo it for every weight row.
    """
    y = (x[:, None, :] * weight[None].float()).sum(-1)                  # (M, N), accumulated in fp32
    return (y if scale is None else y * scale).to(dtype)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) and fp32 scale (N,) -> out (N, K), in out's dtype, in one fused pass."""
    return out.copy_((weight.float() * scale[:, None]).to(out.dtype))


SCRATCH_MAX = 1 << 26  # elements: larger dequantized weights (a vocabulary head) get a fresh tensor
_local = threading.local()  # .scratch: (N, K, dtype) -> a reusable (N, K) tensor for _dequantize's output


def _scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer for a dequantized weight. Reusing it matters more than the arithmetic: a fresh
    64 MB tensor is new pages that the kernel faults in and zeroes, 14 ms on a 2-core Xeon, where
    dequantizing into existing memory takes 3.5 ms (BENCHMARKS.md)."""
    if shape[0] * shape[1] > SCRATCH_MAX:
        return torch.empty(shape, dtype=dtype)
    buffers = _local.__dict__.setdefault("scratch", {})
    if (shape, dtype) not in buffers:
        buffers[shape, dtype] = torch.empty(shape, dtype=dtype)
    return buffers[shape, dtype]


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


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x) = x·(1 + tanh(z))/2 with z = √(2/π)·(x + 0.044715·x³), written as x·sigmoid(2z): the same
    function, but inductor's vectorised sigmoid is 2.5x faster than its tanh (1.6 vs 3.9 ms per 268×16384)."""
    return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x) in fp32, rounded once to x.dtype."""
    return _gelu_tanh(x.float()).to(x.dtype)


def _geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) · up in fp32, rounded once to gate.dtype."""
    return (_gelu_tanh(gate.float()) * up.float()).to(gate.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(R, D) rows normalised as gemma.RMSNorm does, in fp32, rounded once to x.dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)


_compiled: dict[tuple, object] = {}  # (function, weight dtype) -> its compiled version
_broken = False  # set when compilation failed once; then the library kernels are used


def _run(fn, *args):
    """Call the compiled `fn` (compiled once per weight dtype); None if compilation is unavailable."""
    global _broken
    if _broken:
        return None
    key = (fn.__name__, args[1].dtype if fn is _matvec else args[0].dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[key](*args)
    except Exception as e:  # no C++ compiler, unsupported platform, ...
        _broken = True
        warnings.warn(f"nanopali.fast: compiling a kernel failed ({type(e).__name__}: {e}); "
                      "using plain PyTorch ops from now on", RuntimeWarning, stacklevel=3)
        return None


def _kernel(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (M, K) -> (M, N) in x.dtype through the compiled _matvec (None if it cannot be compiled)."""
    # detach: a Parameter and a plain Tensor would compile twice
    return _run(_matvec, x.float(), weight.detach(), scale, x.dtype)


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes the one-row path (the compiled loop or the library kernel, see `using`)."""
    return _fast_context(x) and x.numel() == weight.shape[-1] and (weight.dtype == torch.int8 or weight.dtype in HALF)


def _fast_context(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.device.type == "cpu"


def _library(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) -> (M, N) through torch's own kernel for the weight's dtype."""
    if weight.dtype == torch.int8 and hasattr(torch, "_weight_int8pack_mm"):
        return torch._weight_int8pack_mm(x, weight, scale.to(x.dtype))
    return _plain(x, weight, scale)  # older torch: int8 dequantized eagerly


def _plain(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The plain path: F.linear, int8 weights dequantized eagerly (a transient copy of one matrix)."""
    if weight.dtype == torch.int8:
        return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None])
    return F.linear(x, weight) if scale is None else F.linear(x, weight) * scale.to(x.dtype)


_forced: str | None = None   # choose(path): every one-row product takes it, and no step is timed
_path = "library"            # the one-row path in force (see `using`)


@contextmanager
def using(path: str):
    """Run the one-row products inside the block on `path` ("loop" or "library"), unless choose() forced one."""
    global _path
    before, _path = _path, path
    try:
        yield
    finally:
        _path = before


def _one_row(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x (1, K) -> (1, N) on the path in force."""
    if (_forced or _path) == "loop" and weight.shape[-1] <= MAX_K:
        y = _kernel(x, weight, scale)
        if y is not None:
            return y
    return _library(x, weight, scale)


class StepChooser:
    """Picks the one-row path by timing whole decode steps (see the module docstring): `run(step)` calls
    step() under a path; the first 2 * (TRIALS + 1) calls alternate between the paths, later ones take the
    faster. One per model: its shapes and dtypes decide. `measure=False` takes the library path from the
    start: for a small model (under MEASURE_MIN_PARAMS decoder parameters, as PaliGemma decides) the steps
    are not bound by the weights' bandwidth, and compiling the loop would cost each process seconds."""

    PATHS = ("loop", "library")

    def __init__(self, measure: bool = True):
        self.measure = measure
        self.times: dict[str, list[float]] = {p: [] for p in self.PATHS}
        self.choice: str | None = None if measure else "library"

    def run(self, step):
        if _forced or self.choice:
            with using(_forced or self.choice):
                return step()
        path = min(self.PATHS, key=lambda p: len(self.times[p]))              # alternate, the loop first
        start = time.perf_counter()
        with using(path):
            out = step()
        self.times[path].append(time.perf_counter() - start)
        if _broken:                                                           # the loop could not be compiled
            self.choice = "library"
        elif all(len(t) > TRIALS for t in self.times.values()):
            self.choice = min(self.PATHS, key=lambda p: statistics.median(self.times[p][1:]))  # 1st call compiles
        return out


def choose(path: str | None) -> None:
    """Force every one-row product onto "loop" or "library"; None lets each StepChooser measure."""
    global _forced
    if path not in ("loop", "library", None):
        raise ValueError(f"path must be 'loop', 'library' or None, not {path!r}")
    _forced = path


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, fast: bool = True) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ, times scale (N,) if given, in x.dtype; see the table in the module docstring."""
    *lead, K = x.shape
    N = weight.shape[0]
    rows = x.numel() // K
    if fast and uses_kernel(x, weight):
        return _one_row(x.reshape(1, K), weight, scale).view(*lead, N)
    if (weight.dtype == torch.int8 and fast and _fast_context(x) and x.dtype in HALF + (torch.float32,)
            and hasattr(torch, "_weight_int8pack_mm")):
        if rows <= MAX_ROWS:
            return _library(x.reshape(rows, K), weight, scale).view(*lead, N)
        w = _run(_dequantize, weight, scale, _scratch(tuple(weight.shape), x.dtype))
        if w is not None:
            return F.linear(x, w)
    return _plain(x, weight, scale)


def _elementwise(x: torch.Tensor, fast: bool) -> bool:
    return fast and _fast_context(x) and x.numel() >= ELEMENTWISE_MIN  # _run falls back once compiling failed


def gelu(x: torch.Tensor, up: torch.Tensor | None = None, fast: bool = True) -> torch.Tensor:
    """gelu_tanh(x), times `up` (same shape) if given: fused and compiled for large inference tensors."""
    if _elementwise(x, fast):
        y = _run(_gelu, x.reshape(-1)) if up is None else _run(_geglu, x.reshape(-1), up.reshape(-1))  # 1-D: one size
        if y is not None:
            return y.view(x.shape)
    y = F.gelu(x, approximate="tanh")
    return y if up is None else y * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fast: bool = True) -> torch.Tensor:
    """Gemma's RMSNorm of x (..., D): x·rsqrt(mean(x²)+eps)·(1+w), computed in fp32, in x.dtype."""
    if _elementwise(x, fast):
        y = _run(_rms_norm, x.reshape(-1, x.shape[-1]), weight.detach(), eps)
        if y is not None:
            return y.view(x.shape)
    return _rms_norm(x, weight, eps)


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
