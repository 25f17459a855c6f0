"""CPU inference kernels for a loaded model: one-row matrix products for decoding, fused elementwise ops.

    kernels = CpuKernels()                      # one per prepared model (inference/runtime.py owns it)
    kernels.linear(x, weight, scale=None)       # x (..., K) @ weight (N, K)ᵀ [· scale (N,)] -> (..., N)
    kernels.gelu(x, up=None); kernels.rms_norm(x, weight, eps); kernels.attention(q, k, v, mask, scale, softcap)
    install(model, kernels)                     # swap the model's linears, the decoder's layers, norms and MLPs
                                                # and the vision MLPs for Fast* ones (an MoE's Experts: FastExperts)

A decode step multiplies one row by every weight, so it is bound by how fast the weights stream. Three
one-row paths exist, "native" (native.py's hand-written bf16 and int8-by-int8 products, compiled for this
processor), "loop" (inductor's compiled (x · w).sum(-1): one vectorised pass over each weight row) and
"library" (torch's F.linear / int8pack kernel; int4: torch's kernel, or native.py's int4 x int8 product);
which is fastest depends on the processor, so a StepChooser times whole decode steps under each and keeps the
fastest. A prefill's products of a large model in bf16 / fp16 run as fp32 GEMMs on the weight widened chunk by
chunk where this processor multiplies half precision slowly (AVX2 without AVX-512 BF16: timed once,
`widen_is_faster`); an int4 prefill of 96 rows or more unpacks each weight into a reused bf16 buffer
(native.dequantize_int4, where AVX-512 VBMI and BF16 are) for the bf16 GEMM. Large inference tensors get gelu,
GeGLU and RMSNorm as one compiled fp32 pass; a large model's decode step gets native.py's one-pass attention,
RMSNorm and GeGLU (install points each GemmaAttention's `attend` at `CpuKernels.attention`), and on the native
path each dense layer's whole step as one native.decode_layer call (FastDecoderLayer: the same arithmetic, without
~20 Python calls a layer). Autograd, a small model's tensors and `CpuKernels(enabled=False)` take the plain ops.
A failed compilation warns once and falls back. Measurements: BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
import warnings
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopali.inference import native
from nanopali.models.gemma import GemmaAttention, GemmaDecoderLayer, TiedEmbedding
from nanopali.models.paligemma import PaliGemma
from nanopali.nn.attention import attention
from nanopali.nn.mlp import GeGLU, GeluMLP, gelu_tanh
from nanopali.nn.moe import Experts, dispatch, grouped_experts, grouped_mm_available
from nanopali.nn.norms import RMSNorm, rms_norm

MAX_ROWS = 16   # int8 batches up to this many rows take _weight_int8pack_mm; more is a prefill
MAX_K = 4096    # longest row the compiled loop takes (longer: the fp32 row no longer fits L1 beside the weight)
TRIALS = 3      # timed decode steps of each one-row path before the faster one is kept
ELEMENTWISE_MIN = 1 << 19  # tensors smaller than this take the eager elementwise ops
MEASURE_MIN_PARAMS = 50_000_000  # smaller decoders take the library path without timing the loop
INT4_KERNEL_ROWS = 1024  # bf16 rows up to which torch's int4 kernel beats unpacking + F.linear
INT4_DEQUANT_ROWS = 96   # bf16 rows from which native.py's unpacking (AVX-512 BF16) + the bf16 GEMM beat it
SCRATCH_MAX = 1 << 26    # elements: larger dequantized weights (a vocabulary head) get a fresh tensor
HALF = (torch.bfloat16, torch.float16)
PATHS = ("native", "loop", "library")
WIDEN_MIN_ROWS = 32      # fewer rows (batched decoding, beams): widening the weight costs more than the GEMM saves
WIDEN_CHUNK = 1 << 22    # elements of weight widened to fp32 at a time (16 MiB, per thread)


def _matvec(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x (M, K) · weight (N, K) of any dtype [· fp32 scale (N,)] -> (M, N) in dtype: one pass over the weight.
    x comes in fp32 (converted once, outside): converting it inside would redo it for every weight row."""
    y = (x[:, None, :] * weight[None].float()).sum(-1)                  # (M, N), accumulated in fp32
    return (y if scale is None else y * scale).to(dtype)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) and fp32 scale (N,) -> out (N, K), in out's dtype, in one fused pass."""
    return out.copy_((weight.float() * scale[:, None]).to(out.dtype))


def unpack_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """torch's CPU int4 packing (`torch._convert_weight_to_int4pack_for_cpu`, uint8 (N, K / 2)) -> uint8 (N, K) in 0..15.

    The layout, as torch 2.13 writes it, with B = `int4_block()` rows per block (64 with AVX-512, 32 with
    AVX2): each block K runs of B/2 bytes whose low nibbles are the block's rows 0..B/2-1 and high nibbles
    rows B/2..B-1; the last N % B rows (a multiple of 16) K runs of (N % B) / 2 bytes, even rows in the low
    nibbles, odd rows in the high ones. quantize.py checks every packed matrix against this, so a changed
    layout fails loudly at load time.
    """
    B = int4_block()
    flat = packed.reshape(-1)
    full, tail = N - N % B, N % B
    blocks = flat[: full * K // 2].view(full // B, K, B // 2)                         # (N/B, K, B/2)
    head = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(full, K)
    if not tail:
        return head
    runs = flat[full * K // 2:].view(K, tail // 2)                                    # (K, tail/2)
    rest = torch.stack([runs & 15, runs >> 4], dim=2).reshape(K, tail).t()            # (tail, K)
    return torch.cat([head, rest])


@functools.cache
def int4_block() -> int:
    """The rows per block of torch's int4 packing on this processor (its kernel's vector width decides)."""
    q = torch.arange(64 * 32, dtype=torch.int32).view(64, 32) % 16
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2).reshape(-1)
    first_run = torch.cat([packed[:32] & 15, packed[:32] >> 4])  # rows 0.. of column 0 if B = 64
    return 64 if torch.equal(first_run, q[:, 0].to(torch.uint8)) else 32


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed int4 (N, K / 2) and (K / G, N, 2) scales and zeros -> (N, K) in dtype: w = (q - 8) · scale + zero."""
    groups, N, _ = scales_and_zeros.shape
    K = packed.numel() * 2 // N
    q = unpack_int4(packed, N, K).view(N, groups, K // groups).float() - 8             # (N, K/G, G)
    scale, zero = scales_and_zeros.float().permute(2, 1, 0)                           # (N, K/G) each
    return (q * scale[..., None] + zero[..., None]).view(N, K).to(dtype)


@functools.cache
def widen_is_faster(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices slower than it widens the weight to fp32 and runs the fp32 GEMM.
    Where the processor has no bf16 arithmetic (AVX2 without AVX-512 BF16 or AMX) torch's bf16 GEMM is emulated: 21
    GFLOP/s against fp32's 130 on a 2-core AVX2-only EPYC (BENCHMARKS.md); with AVX-512 BF16 it is the faster one.
    Timed once per process and dtype on a 64 x 1024 x 1024 product, best of 3 each; widening must win by 1.5x."""
    x, w, wide = torch.randn(64, 1024).to(dtype), torch.randn(1024, 1024).to(dtype), torch.empty(1024, 1024)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)
    with torch.no_grad():
        return 1.5 * best(lambda: F.linear(x.float(), wide.copy_(w))) < best(lambda: F.linear(x, w))


def _gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x) = x·(1 + tanh(z))/2 with z = √(2/π)·(x + 0.044715·x³), written as x·sigmoid(2z): the same
    function, which inductor vectorises better than its tanh."""
    return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x) in fp32, rounded once to x.dtype."""
    return _gelu_sigmoid(x.float()).to(x.dtype)


def _geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) · up in fp32, rounded once to gate.dtype."""
    return (_gelu_sigmoid(gate.float()) * up.float()).to(gate.dtype)


def plain_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The plain path: F.linear, int8 weights dequantized eagerly (a transient copy of one matrix)."""
    if weight.dtype == torch.int8:
        return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None])
    return F.linear(x, weight) if scale is None else F.linear(x, weight) * scale.to(x.dtype)


def _inference_cpu(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and x.device.type == "cpu"


class StepChooser:
    """Picks the one-row path by timing whole decode steps: `run(step, kernels)` calls step() under a path;
    the first calls take the paths in turn (native, loop, library; "native" only where native.py's kernels
    build, "loop" dropped if it cannot compile), TRIALS + 1 each (each path's first call compiles and is not
    counted); later ones take the path of the fastest median. `measure=False` takes the library
    path from the start (a small model is not bound by its weights' bandwidth, and compiling costs seconds)."""

    def __init__(self, measure: bool = True):
        self.measure = measure
        self.times: dict[str, list[float]] | None = None  # per path; the paths are known at the first step
        self.choice: str | None = None if measure else "library"

    def run(self, step, kernels: "CpuKernels"):
        if kernels.forced or self.choice:
            with kernels.using(kernels.forced or self.choice):
                return step()
        if self.times is None:  # the hand-written kernels only where they build (native.py)
            self.times = {p: [] for p in PATHS if p != "native" or native.available()}
        path = min(self.times, key=lambda p: len(self.times[p]))
        start = time.perf_counter()
        with kernels.using(path):
            out = step()
        self.times[path].append(time.perf_counter() - start)
        if kernels.broken:                                                    # the loop could not be compiled
            self.times.pop("loop", None)
        if all(len(t) > TRIALS for t in self.times.values()):
            self.choice = min(self.times, key=lambda p: statistics.median(self.times[p][1:]))
        return out


class CpuKernels:
    """The kernels and their state for one prepared model: compiled functions, the one-row path in force,
    an optional forced path, the step chooser and per-thread scratch buffers for dequantized weights.

    enabled=False: every call takes the plain ops (the debugging switch, `--no-fast`).
    measure=False (a small decoder): the library one-row path without timing, and no compiled elementwise ops.
    force="loop" | "library": every one-row product takes that path and no step is timed.
    """

    def __init__(self, enabled: bool = True, measure: bool = True, force: str | None = None):
        if force not in (*PATHS, None):
            raise ValueError(f"force must be one of {PATHS} or None, not {force!r}")
        self.enabled, self.forced = enabled, force
        self.chooser = StepChooser(measure)
        self.path = "library"        # the one-row path in force outside a timed step
        self.broken = False          # set when compiling failed once: plain ops from then on
        self._compiled: dict[tuple, object] = {}
        self._local = threading.local()

    def __deepcopy__(self, memo) -> "CpuKernels":
        """Shared, not copied: a deep copy of a prepared model computes with the kernels (and under the path) of the
        runtime that prepared it."""
        return self

    def __getstate__(self) -> dict:
        """Pickled (torch.save of a whole model) without the compiled functions and per-thread buffers, which are
        remade on first use."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_compiled", "_local")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _compiled={}, _local=threading.local())

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def using(self, path: str):
        """Run the one-row products inside the block on `path`, unless a path is forced."""
        before, self.path = self.path, path
        try:
            yield
        finally:
            self.path = before

    def run_step(self, step):
        """A decode step under the chooser's path (timed while it is still choosing)."""
        return self.chooser.run(step, self) if self.enabled else step()

    def _run(self, fn, *args):
        """Call the compiled `fn` (once per function and weight dtype); None if compilation is unavailable."""
        if self.broken:
            return None
        key = (fn.__name__, args[1].dtype if fn is _matvec else args[0].dtype)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=True)
        try:
            return self._compiled[key](*args)
        except Exception as e:  # no C++ compiler, unsupported platform, ...
            self.broken = True
            warnings.warn(f"nanopali.inference.cpu_kernels: compiling a kernel failed ({type(e).__name__}: {e}); "
                          "using plain PyTorch ops from now on", RuntimeWarning, stacklevel=3)
            return None

    def scratch(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A per-thread buffer for a dequantized weight: reusing memory avoids faulting in fresh pages each call."""
        if shape[0] * shape[1] > SCRATCH_MAX:
            return torch.empty(shape, dtype=dtype)
        buffers = self._local.__dict__.setdefault("scratch", {})
        if (shape, dtype) not in buffers:
            buffers[shape, dtype] = torch.empty(shape, dtype=dtype)
        return buffers[shape, dtype]

    # ---------------------------------------------------------------- products

    def takes_one_row(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether linear(x, weight) takes the one-row path (the loop or the library kernel)."""
        return (self.enabled and _inference_cpu(x) and x.numel() == weight.shape[-1]
                and (weight.dtype == torch.int8 or weight.dtype in HALF))

    def _library(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if weight.dtype == torch.int8 and hasattr(torch, "_weight_int8pack_mm"):
            return torch._weight_int8pack_mm(x, weight, scale.to(x.dtype))
        return plain_linear(x, weight, scale)

    def _one_row(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if (self.forced or self.path) == "native":
            y = native.gemv(x, weight.detach(), scale)
            if y is not None:
                return y.to(x.dtype)
        if (self.forced or self.path) == "loop" and weight.shape[-1] <= MAX_K:
            y = self._run(_matvec, x.float(), weight.detach(), scale, x.dtype)  # detach: one compile for both
            if y is not None:
                return y
        return self._library(x, weight, scale)

    def widened(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) half · weight (N, K)ᵀ (half, or int8 with its row scale) [+ bias] by fp32 GEMMs on chunks of
        the weight widened into a per-thread buffer -> (..., N) in x.dtype, rounded once. yᵀ is computed so that each
        chunk fills rows of it."""
        *lead, K = x.shape
        N, weight = weight.shape[0], weight.detach()
        xt, out = x.reshape(-1, K).float().t(), torch.empty(N, x.numel() // K)
        step = max(1, WIDEN_CHUNK // K)
        buffer = self.scratch((min(step, N), K), torch.float32)
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            w = buffer[: n1 - n0]
            if scale is None:
                w.copy_(weight[n0:n1])
            else:
                torch.mul(weight[n0:n1], scale[n0:n1, None], out=w)
            torch.mm(w, xt, out=out[n0:n1])
        if bias is not None:
            out += bias.float()[:, None]
        return out.t().to(x.dtype).view(*lead, N)

    def widens(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether linear(x, weight) runs as fp32 GEMMs on a widened weight: a large model's (measure=True) product
        of WIDEN_MIN_ROWS rows or more in a half dtype this CPU multiplies slowly (widen_is_faster)."""
        return (self.enabled and self.chooser.measure and _inference_cpu(x) and x.dtype in HALF
                and weight.dtype in (x.dtype, torch.int8) and x.numel() >= WIDEN_MIN_ROWS * weight.shape[-1]
                and widen_is_faster(x.dtype))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) @ weight (N, K)ᵀ, times scale (N,) if given, in x.dtype."""
        *lead, K = x.shape
        N = weight.shape[0]
        rows = x.numel() // K
        if self.takes_one_row(x, weight):
            return self._one_row(x.reshape(1, K), weight, scale).view(*lead, N)
        if self.widens(x, weight):
            return self.widened(x, weight, scale)
        if (weight.dtype == torch.int8 and self.enabled and _inference_cpu(x) and x.dtype in HALF + (torch.float32,)
                and hasattr(torch, "_weight_int8pack_mm")):
            if rows <= MAX_ROWS:
                y = native.gemv(x.reshape(rows, K), weight, scale) if (self.forced or self.path) == "native" else None
                return (self._library(x.reshape(rows, K), weight, scale) if y is None else y.to(x.dtype)).view(*lead, N)
            w = self._run(_dequantize, weight, scale, self.scratch(tuple(weight.shape), x.dtype))
            if w is not None:
                return F.linear(x, w)
        return plain_linear(x, weight, scale)

    def linear_int4(self, x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        """x (..., K) @ the int4 weight (N, K)ᵀ (quantize.Int4Linear's buffers) -> (..., N) in x.dtype."""
        *lead, K = x.shape
        groups, N, _ = scales_and_zeros.shape
        rows = x.numel() // K
        if rows == 1 and self.enabled and _inference_cpu(x) and (self.forced or self.path) == "native":
            y = native.gemv_int4(x, packed, scales_and_zeros, int4_block())
            if y is not None:
                return y.to(x.dtype).view(*lead, N)
        if rows >= INT4_DEQUANT_ROWS and x.dtype == torch.bfloat16 and self.enabled and _inference_cpu(x):
            weight = self.scratch((N, K), torch.bfloat16)
            if native.dequantize_int4(packed, scales_and_zeros, int4_block(), weight):
                return F.linear(x, weight)
        if self.enabled and _inference_cpu(x) and rows <= (INT4_KERNEL_ROWS if x.dtype == torch.bfloat16 else 4):
            return torch._weight_int4pack_mm_for_cpu(x.reshape(-1, K), packed, K // groups,
                                                     scales_and_zeros.to(x.dtype)).view(*lead, N)
        return F.linear(x, dequantize_int4(packed, scales_and_zeros, x.dtype))  # a transient copy

    # ---------------------------------------------------------------- elementwise

    def _elementwise(self, x: torch.Tensor) -> bool:
        """Large inference tensors of a large model (measure=True): a small one (the default model) would stall
        for the compile (seconds, e.g. at a server's first prefill of 8 rows) to save nothing."""
        return self.enabled and self.chooser.measure and _inference_cpu(x) and x.numel() >= ELEMENTWISE_MIN

    def _native_step_op(self, x: torch.Tensor) -> bool:
        """A decode step's small tensors in a large model (measure=True) take native.py's one-pass kernels: eager
        torch spends 16-25 us on an RMSNorm or a GeGLU of one row in several ops, attention 150 us (3B, 2 cores)."""
        return (self.enabled and self.chooser.measure and _inference_cpu(x) and x.numel() < ELEMENTWISE_MIN
                and native.available())

    def native_layers(self, x: torch.Tensor) -> bool:
        """Whether a decode step's decoder layers of a large model run as native.decode_layer calls: on the native path,
        with the step ops native too."""
        return (self.forced or self.path) == "native" and self._native_step_op(x)

    def gelu(self, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        """gelu_tanh(x), times `up` (same shape) if given: fused, compiled for large inference tensors and native
        for a decode step's."""
        if self._elementwise(x):
            y = self._run(_gelu, x.reshape(-1)) if up is None else self._run(_geglu, x.reshape(-1), up.reshape(-1))
            if y is not None:
                return y.view(x.shape)
        elif up is not None and self._native_step_op(x):
            y = native.geglu(x, up)
            if y is not None:
                return y
        y = gelu_tanh(x)
        return y if up is None else y * up

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """nn.norms.rms_norm of x (..., D), as one compiled pass for large inference tensors and a native one for a
        decode step's."""
        if self._elementwise(x):
            y = self._run(rms_norm, x.reshape(-1, x.shape[-1]), weight.detach(), eps)
            if y is not None:
                return y.view(x.shape)
        elif self._native_step_op(x):
            y = native.rms_norm(x, weight, eps)
            if y is not None:
                return y
        return rms_norm(x, weight, eps)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
        """nn.attention.attention, whose signature it has; a decode step's one query row in a large model takes
        native.attend_one_row (the same fp32 arithmetic as the explicit path, Gemma 2's soft-cap in fp32 too)."""
        if q.shape[2] == 1 and mask is not None and self._native_step_op(q):
            out = native.attend_one_row(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale, softcap)
            if out is not None:
                return out
        return attention(q, k, v, mask, scale=scale, softcap=softcap)


PLAIN = CpuKernels(enabled=False)  # stateless when disabled: what unprepared quantized layers use


# -------------------------------------------------------------------- the modules install() puts in


class FastLinear(nn.Module):
    """An nn.Linear (the same `weight` and `bias` Parameters) whose products take `kernels.linear`: a decode step's
    one row, and a prefill's rows widened to fp32 where that is faster."""

    def __init__(self, linear: nn.Linear, kernels: CpuKernels):
        super().__init__()
        self.weight, self.bias, self.kernels = linear.weight, linear.bias, kernels
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def native_weight(self) -> native.Weight | None:
        """The weight as native.decode_layer reads it (None with a bias, or where its kernel does not take it)."""
        return native.bf16_weight(self.weight.detach()) if self.bias is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.takes_one_row(x, self.weight):
            y = self.kernels.linear(x, self.weight)
            return y if self.bias is None else y + self.bias
        if self.kernels.widens(x, self.weight):
            return self.kernels.widened(x, self.weight, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


class FastEmbedding(nn.Module):
    """The tied embedding (the same `weight`) whose output head takes `kernels.linear`."""

    def __init__(self, embedding: TiedEmbedding, kernels: CpuKernels):
        super().__init__()
        self.weight, self.kernels = embedding.weight, kernels

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(h, self.weight)


class FastRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm, kernels: CpuKernels):
        super().__init__()
        self.weight, self.eps, self.kernels = norm.weight, norm.eps, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class FastGeGLU(nn.Module):
    """GeGLU with the same projections, gelu(gate)·up fused."""

    def __init__(self, mlp: GeGLU, kernels: CpuKernels):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.kernels = mlp.gate_proj, mlp.up_proj, mlp.down_proj, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.gelu(self.gate_proj(x), self.up_proj(x)))


class FastGeluMLP(nn.Module):
    """SigLIP's MLP with the same layers, its gelu fused."""

    def __init__(self, mlp: GeluMLP, kernels: CpuKernels):
        super().__init__()
        self.fc1, self.fc2, self.kernels = mlp.fc1, mlp.fc2, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.kernels.gelu(self.fc1(x)))


class FastExperts(nn.Module):
    """Mixture-of-experts Experts whose products take the kernels: each expert's rows through `kernels.linear` (a
    decoded token's expert is a one-row product), gelu(gate)·up fused; float bf16 weights take the grouped GEMM
    as Experts does, but for a CPU decode step's one row. With the float Experts' own parameters,
    or with `quantized` buffers from quantize.py: gate_up_proj / down_proj int8 (E, N, K) with fp32 row scales
    gate_up_scale / down_scale (E, N), or int4 packed uint8 (E, N, K / 2) with their (E, K / G, N, 2) scales
    and zeros."""

    def __init__(self, experts: Experts, kernels: CpuKernels, quantized: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.kernels, self.num_experts = kernels, experts.num_experts
        if quantized is None:
            self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
            self.gate_up_scale = self.down_scale = None
        else:
            for name, tensor in quantized.items():
                self.register_buffer(name, tensor)

    def _product(self, rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if weight.dtype == torch.uint8:
            return self.kernels.linear_int4(rows, weight, scale)
        return self.kernels.linear(rows, weight, scale)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # float weights: the grouped GEMM, as Experts, except for the one row of a CPU decode step (the kernels' one-row
        # products); a GPU decode step keeps it, where the expert loop would sync the host and break CUDA graphs
        if self.gate_up_scale is None and (x.shape[0] > 1 or not _inference_cpu(x)) and grouped_mm_available(x):
            return dispatch(x, experts, weights, self.num_experts,
                            grouped=lambda rows, offsets: grouped_experts(rows, offsets, self.gate_up_proj,
                                                                          self.down_proj))
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        gate_up_scale, down_scale = ([None] * self.num_experts if s is None else s.unbind(0)
                                     for s in (self.gate_up_scale, self.down_scale))

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            h = self._product(rows, gate_up[e], gate_up_scale[e])                              # (n, 2I)
            return self._product(self.kernels.gelu(*h.chunk(2, dim=-1)), down[e], down_scale[e])  # (n, D)
        return dispatch(x, experts, weights, self.num_experts, expert)


def _no_cache() -> None:
    """What FastDecoderLayer's weak reference to a KV cache gives before its first decode step."""
    return None


class FastDecoderLayer(GemmaDecoderLayer):
    """A GemmaDecoderLayer with the same modules (so the same parameters and state-dict keys) whose decode step of
    one row, in a large model on the native path, is one native.decode_layer call: the seven products and the glue
    between them in C, rounded where the per-op path rounds, so the result is the per-op native path's bit for bit.
    The per-op path spends ~0.2 ms of Python a layer (3B, BENCHMARKS.md). Anything else (a prefill, a batch, autograd,
    another path, a layer whose modules are not all the kernels' own: LoRA, experts) runs GemmaDecoderLayer.forward.

    The layer's weights are read once per KV cache (a generation, or a continuous batch's relayout): weights replaced
    in the middle of a generation are seen from the next one (the old tensors stay alive until then)."""

    def __init__(self, layer: GemmaDecoderLayer, kernels: CpuKernels):
        nn.Module.__init__(self)
        self.post_norms, self.kernels = layer.post_norms, kernels
        for name, child in layer.named_children():
            setattr(self, name, child)
        self._spec: native.Layer | None = None   # holds what it points into (native.layer)
        self._cache = _no_cache                  # a weak reference to the KV cache the spec was made for

    def __getstate__(self) -> dict:
        """A copy or a pickle makes its own spec at its first step: this one points into the original's weights."""
        return {**super().__getstate__(), "_spec": None, "_cache": _no_cache}

    def native_spec(self) -> native.Layer | None:
        """The native.Layer of this layer's current modules and weights, or None where one of them has no kernel."""
        attn, mlp = self.self_attn, self.mlp
        if type(attn) is not GemmaAttention or type(mlp) is not FastGeGLU or attn.attend != self.kernels.attention:
            return None
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        norms = [self.input_layernorm, self.post_attention_layernorm if self.post_norms else None,
                 self.pre_feedforward_layernorm if self.post_norms else self.post_attention_layernorm,
                 self.post_feedforward_layernorm if self.post_norms else None]
        weights = [getattr(m, "native_weight", lambda: None)() for m in projections]
        if None in weights:
            return None
        norms = [None if n is None else n.weight.detach() for n in norms]
        return native.layer(weights, norms, attn.heads, attn.kv_heads, attn.head_dim, self.input_layernorm.eps,
                            attn.scale, attn.softcap)

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        if cache is not None and x.shape[:2] == (1, 1) and self.kernels.native_layers(x):
            if self._cache() is not cache:
                self._spec, self._cache = self.native_spec(), weakref.ref(cache)
            if self._spec is not None:
                i = self.self_attn.layer_idx
                y = native.decode_layer(self._spec, x, cos, sin, cache.k[i], cache.v[i], slots, mask)
                if y is not None:
                    return y
        return super().forward(x, cos, sin, mask, cache, slots)


def _replacement(module: nn.Module, kernels: CpuKernels) -> nn.Module | None:
    if type(module) is GemmaDecoderLayer:
        return FastDecoderLayer(module, kernels)
    if type(module) is Experts:
        return FastExperts(module, kernels)
    if type(module) is GeGLU:
        return FastGeGLU(module, kernels)
    if type(module) is GeluMLP:
        return FastGeluMLP(module, kernels)
    if type(module) is RMSNorm:
        return FastRMSNorm(module, kernels)
    if type(module) is nn.Linear:
        return FastLinear(module, kernels)
    return None


def adopt(model: nn.Module, kernels: CpuKernels) -> None:
    """Point every module of `model` that computes with some CpuKernels (Fast* and quantized modules, attention
    layers given `attend`) at `kernels`: a model prepared again, or a prepared model's copy, then follows the new
    runtime (its path, its chooser, cpu_kernels=False), not the kernels it was first prepared with."""
    for module in model.modules():
        if isinstance(getattr(module, "kernels", None), CpuKernels):
            module.kernels = kernels
        if isinstance(module, GemmaAttention) and isinstance(getattr(module.attend, "__self__", None), CpuKernels):
            module.attend = kernels.attention


def install(model: PaliGemma, kernels: CpuKernels) -> nn.Module:
    """Replace, in place, the modules of a PaliGemma that have a fast form: every linear layer, the decoder's
    layers, norms and GeGLUs, its tied head, and the vision tower's MLPs; and give the decoder's attention layers
    `kernels.attention`. Parameters and state-dict keys stay as they were."""
    decoder = model.decoder
    for root in (decoder, model.vision, model.multi_modal_projector):
        for _, parent in reversed(list(root.named_modules())):  # children first: a FastGeGLU gets FastLinears
            for child_name, child in list(parent.named_children()):
                new = _replacement(child, kernels)
                if new is not None:
                    setattr(parent, child_name, new)
    for layer in decoder.layers:
        layer.self_attn.attend = kernels.attention
    if type(decoder.embed_tokens) is TiedEmbedding:  # an Int8Embedding already takes the kernels
        decoder.embed_tokens = FastEmbedding(decoder.embed_tokens, kernels)
    return model
