"""Weight-only int8 / int4 quantization of the Gemma decoder, a transform applied to a loaded model.

    runtime = nanopali.inference.prepare(model, quantize="int8")   # or quantize(model, "int8", kernels)

int8: every decoder linear layer (q/k/v/o, gate/up/down) and the token embedding, which is also the
tied output head, get int8 weights with one fp32 scale per output channel (per vocabulary row for the
embedding): scale = max|w| / 127, w ≈ round(w / scale) · scale. Activations stay in the model dtype.
int4: the same linear layers group-wise, as gpt-fast does: each run of G (128) weights along the input
gets its own scale and zero, w ≈ (q - 8) · scale + zero, q in 0..15, packed two per byte as torch's
`_weight_int4pack_mm_for_cpu` wants; a layer the kernel cannot take stays int8. The embedding keeps its int8 rows
for lookups, and the head reads an int4 copy of them, whose best 64 logits a row are recomputed from the int8 rows
(Int8Embedding): the 3B's step reads 280 MB of head instead of 527, and the argmax stays the int8 head's wherever
that winner is among the int4 head's best 64 (BENCHMARKS.md).
A mixture-of-experts layer's experts are quantized the same way, each expert matrix on its own (int8 per
row; int4 per group, packed expert by expert), into a cpu_kernels.FastExperts; its router (`gate`) stays in
float, since a rounded router picks other experts. The products run through cpu_kernels.CpuKernels. The SigLIP
tower and the projector are not quantized: they run once per image. A quantized model is for inference only:
`save_pretrained` refuses it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopali.config import PaliGemmaConfig
from nanopali.devices import resolve_device, resolve_dtype
from nanopali.errors import UsageError
from nanopali.inference import native
from nanopali.inference.cpu_kernels import PLAIN, CpuKernels, FastExperts, int4_block, unpack_int4
from nanopali.io.hf_checkpoint import Rows, checkpoint_dir, load_into
from nanopali.models.paligemma import PaliGemma
from nanopali.nn.moe import Experts, SparseMoE

MODES = ("int8", "int4")
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 kernel takes
# weights quantized at a time: 4 MB of fp32 temporaries each (2^22, 16 MB, left more of them in glibc's heap: the 3B's
# int4 load peaked at 1.12-1.20x the model + baseline, varying by run; now 1.045 with release_freed_memory; #25: 1.15)
CHUNK = 1 << 20
RESCORED = 64    # logits per row that an int4 head recomputes from the int8 rows (Int8Embedding)
EXPERT_SCALES = {"gate_up_proj": "gate_up_scale", "down_proj": "down_scale"}  # FastExperts' quantized buffers


def quantize_rows(weight: torch.Tensor | Rows, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (int8 (N, K), fp32 scale (N,)) with weight ≈ int8 · scale[:, None].

    Works on `chunk` weights at a time (whole rows), so the fp32 temporaries stay small (the 257216-row
    embedding would otherwise need several GB of them), and a weight not yet read (hf_checkpoint.Rows) is
    read a chunk at a time.
    """
    N, K = weight.shape
    chunk = max(1, chunk // K)  # rows
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    for start in range(0, N, chunk):
        w = weight[start:start + chunk].detach().float()                     # (chunk, K)
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[start:start + chunk] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[start:start + chunk] = s
    return q, scale


def int4_group(N: int, K: int, preferred: int = 128) -> int | None:
    """The group size an (N, K) weight gets: the largest kernel-supported size <= preferred dividing K (None: stays int8)."""
    if N % 16:
        return None
    return next((g for g in INT4_GROUPS if g <= preferred and K % g == 0), None)


def quantize_groups(weight: torch.Tensor | Rows, group: int, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (int32 q (N, K) in 0..15, fp32 scales and zeros (K / group, N, 2)) with
    weight ≈ (q - 8) · scale + zero per run of `group` weights of a row (min -> 0, max -> 15); `chunk` weights
    (whole rows) at a time."""
    N, K = weight.shape
    chunk = max(1, chunk // K)  # rows
    q = torch.empty(N, K, dtype=torch.int32, device=weight.device)
    scales_and_zeros = torch.empty(K // group, N, 2, dtype=torch.float32, device=weight.device)
    for start in range(0, N, chunk):
        w = weight[start:start + chunk].detach().float().view(-1, K // group, group)  # (chunk, K/G, G)
        lo, hi = w.amin(-1), w.amax(-1)                                                # (chunk, K/G)
        scale = (hi - lo).clamp(min=1e-12) / 15
        q[start:start + chunk] = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).view(-1, K).int()
        scales_and_zeros[:, start:start + chunk] = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1)
    return q, scales_and_zeros


def quantize_int4(weight: torch.Tensor | Rows, group: int, chunk: int = CHUNK,
                  rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (uint8 (N, K / 2) packed as torch's CPU int4 kernel wants, fp32 scales and zeros
    (K / group, N, 2)): quantize_groups and torch's packing, a few blocks of rows at a time. The packing lays out
    blocks of int4_block() rows one after the other (the last N % block rows at the end), so packing whole blocks
    separately gives the bytes of packing the matrix at once, without its int32 (N, K) codes.
    `rows` (N < rows < N + 16): zero rows (q 0, scale and zero 0) appended up to that many, as the kernel wants a
    multiple of 16 (Int8Embedding's int4 head)."""
    N, K = weight.shape
    P = N if rows is None else rows
    if not N <= P < N + 16:
        raise ValueError(f"{P} rows cannot pad a weight of {N} rows (at most 15 zero rows are appended)")
    check_int4_layout()
    step = max(1, chunk // K // int4_block()) * int4_block()
    if P - step < int4_block():
        step = P
    packed = torch.empty(P * K // 2, dtype=torch.uint8)
    scales_and_zeros = torch.zeros(K // group, P, 2, dtype=torch.float32)
    for start in range(0, P, step):
        stop = P if P - start < step + int4_block() else start + step  # the tail goes with the last whole blocks
        q, scales_and_zeros[:, start:min(stop, N)] = quantize_groups(weight[start:min(stop, N)], group)
        q = F.pad(q, (0, 0, 0, stop - start - q.shape[0]))                  # the zero rows, if any
        packed[start * K // 2:stop * K // 2] = torch._convert_weight_to_int4pack_for_cpu(q, 2).view(-1)
        if stop == P:
            break
    return packed.view(P, K // 2), scales_and_zeros


@functools.cache
def check_int4_layout() -> None:
    """RuntimeError if this torch packs int4 weights in a layout cpu_kernels.unpack_int4 does not know."""
    q = torch.randint(0, 16, (80, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    if not torch.equal(unpack_int4(torch._convert_weight_to_int4pack_for_cpu(q, 2), 80, 64), q.to(torch.uint8)):
        raise RuntimeError(f"torch {torch.__version__} packs int4 weights in a layout cpu_kernels.unpack_int4 does "
                           "not know; int4 is not supported with this torch (use int8)")


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights (N, K) and per-output-channel scales (N,)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, kernels: CpuKernels = PLAIN):
        super().__init__()
        self.kernels = kernels
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor | Rows, kernels: CpuKernels = PLAIN) -> "Int8Linear":
        return cls(*quantize_rows(weight), kernels)

    def native_weight(self) -> native.Weight | None:
        """The weight as native.decode_layer reads it (W8A8), or None."""
        return native.int8_weight(self.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """A bias-free linear layer with group-wise int4 weights, packed as torch's CPU int4 kernel wants them."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, kernels: CpuKernels = PLAIN):
        super().__init__()
        self.kernels = kernels
        self.register_buffer("weight", packed)                         # uint8 (N, K / 2)
        self.register_buffer("scales_and_zeros", scales_and_zeros)     # (K / G, N, 2), in the model's dtype
        groups, N, _ = scales_and_zeros.shape
        self.in_features, self.out_features = packed.numel() * 2 // N, N
        self.group = self.in_features // groups

    @classmethod
    def quantize(cls, weight: torch.Tensor | Rows, group: int, dtype: torch.dtype,
                 kernels: CpuKernels = PLAIN) -> "Int4Linear":
        """Scales and zeros in `dtype`, the model's: the kernel wants them in the activations' dtype."""
        packed, scales_and_zeros = quantize_int4(weight, group)
        return cls(packed, scales_and_zeros.to(dtype), kernels)

    def native_weight(self) -> native.Weight | None:
        """The weight as native.decode_layer reads it (W4A8), or None."""
        return native.int4_weight(self.weight, self.scales_and_zeros, int4_block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int4(x, self.weight, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"


class Int8Embedding(nn.Module):
    """The token embedding / tied output head with int8 rows (V, D) and one scale per row (V,).

    With an int4 head (`quantize="int4"`, `group` given): also the rows in int4 (`head_weight`, `head_scales_and_zeros`,
    padded with zero rows to a multiple of 16), which the head reads instead of the int8 rows, a decode step's largest
    read (the 3B: 280 MB against 527). The RESCORED best logits of each row are then recomputed from the int8 rows,
    in fp32: the argmax, and so greedy decoding, is the int8 head's unless the int4 error moved the int8 winner out of
    the int4 head's top RESCORED; the other logits keep the int4 head's error. Lookups read the int8 rows.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, kernels: CpuKernels = PLAIN,
                 head: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.kernels = kernels
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.dtype = dtype  # the dtype looked-up rows come back in
        if head is not None:
            self.register_buffer("head_weight", head[0])             # uint8 (V', D / 2), V' = V rounded up to 16
            self.register_buffer("head_scales_and_zeros", head[1])   # (D / G, V', 2) in the model's dtype
        else:
            self.head_weight = None

    @classmethod
    def quantize(cls, weight: torch.Tensor | Rows, dtype: torch.dtype, kernels: CpuKernels = PLAIN,
                 group: int | None = None) -> "Int8Embedding":
        """int8 rows; with `group`, also the int4 head with groups of that many weights (scales in `dtype`)."""
        head = None
        if group is not None:
            packed, scales_and_zeros = quantize_int4(weight, group, rows=head_rows(weight.shape[0]))
            head = packed, scales_and_zeros.to(dtype)
        return cls(*quantize_rows(weight), dtype, kernels, head)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> their rows (..., D), dequantized in fp32."""
        return F.embedding(ids, self.weight).float() * self.scale[ids][..., None]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> rows (B, T, D) in the original dtype."""
        return self.rows(input_ids).to(self.dtype)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., V)."""
        if self.head_weight is None:
            return self.kernels.linear(h, self.weight, self.scale)
        V = self.weight.shape[0]
        logits = self.kernels.linear_int4(h, self.head_weight, self.head_scales_and_zeros)[..., :V]
        best = logits.topk(min(RESCORED, V), dim=-1).indices                                  # (..., k)
        exact = (self.rows(best) @ h.float()[..., None]).squeeze(-1)                          # (..., k)
        return logits.scatter(-1, best, exact.to(logits.dtype))


def head_rows(vocab: int) -> int:
    """The int4 head's rows: the vocabulary rounded up to the 16 rows torch's int4 packing wants."""
    return -(-vocab // 16) * 16


def quantize_expert_weight(weight: torch.Tensor | Rows, mode: str, group_size: int,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture of experts' fused weight (E, N, K), expert by expert as a linear layer's would be: (int8 (E, N, K),
    fp32 row scales (E, N)), or for int4 where the kernel takes (N, K) (packed uint8 (E, N, K / 2), scales and zeros
    (E, K / G, N, 2) in `dtype`)."""
    E, N, K = weight.shape
    group = int4_group(N, K, preferred=group_size) if mode == "int4" else None
    parts = [quantize_rows(weight[e:e + 1][0]) if group is None else quantize_int4(weight[e:e + 1][0], group)
             for e in range(E)]
    q, scales = (torch.stack(t) for t in zip(*parts))
    return q, scales if group is None else scales.to(dtype)


def quantize_experts(experts: Experts, mode: str, group_size: int, kernels: CpuKernels) -> FastExperts:
    """A loaded Experts module, quantized (quantize_expert_weight) into a FastExperts."""
    buffers = {}
    for name, scale in EXPERT_SCALES.items():
        weight = getattr(experts, name).detach()
        buffers[name], buffers[scale] = quantize_expert_weight(weight, mode, group_size, weight.dtype)
    return FastExperts(experts, kernels, quantized=buffers)


QUANTIZED = (Int8Linear, Int4Linear, Int8Embedding, FastExperts)  # every module with `kernels` quantization puts in


def quantized_module(weight: torch.Tensor | Rows, embedding: bool, mode: str, group_size: int, dtype: torch.dtype,
                     kernels: CpuKernels = PLAIN) -> nn.Module:
    """The quantized form of one decoder weight: the embedding int8 per row; a linear layer int8, or for int4 group-wise
    int4 where the kernel takes its shape (int8 otherwise)."""
    if embedding:
        group = int4_group(head_rows(weight.shape[0]), weight.shape[1], group_size) if mode == "int4" else None
        return Int8Embedding.quantize(weight, dtype, kernels, group)
    group = int4_group(*weight.shape, preferred=group_size) if mode == "int4" else None
    return Int8Linear.quantize(weight, kernels) if group is None else Int4Linear.quantize(weight, group, dtype, kernels)


def targets(model: PaliGemma) -> tuple[dict[str, tuple[nn.Module, str]], dict[str, SparseMoE]]:
    """What quantization replaces, by module name (= state-dict prefix): (parent module, attribute) of the linear
    layers of every decoder layer's attention and MLP (of a mixture of experts, its shared expert's: the routers
    stay float) and of the token embedding (the tied head); and the mixtures of experts whose `experts` it replaces."""
    decoder = model.decoder
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    found, moes = {}, {}
    for i, layer in enumerate(decoder.layers):
        parents = {"self_attn": layer.self_attn, "mlp": layer.mlp}
        if isinstance(layer.mlp, SparseMoE):
            moes[f"{prefix}.layers.{i}.mlp.experts"] = layer.mlp
            del parents["mlp"]
            if layer.mlp.shared_expert is not None:
                parents["mlp.shared_expert"] = layer.mlp.shared_expert
        for part, parent in parents.items():
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    if child.bias is not None:
                        raise ValueError(f"{prefix}.layers.{i}.{part}.{name} has a bias: only bias-free layers (Gemma's) "
                                         "are quantized")
                    found[f"{prefix}.layers.{i}.{part}.{name}"] = (parent, name)
    found[f"{prefix}.embed_tokens"] = (decoder, "embed_tokens")
    return found, moes


def quantized_mode(model: PaliGemma) -> str | None:
    """"int8" or "int4" if the model's decoder was quantized (an int4 model has int8 layers too), else None."""
    kinds = {type(m) for m in model.decoder.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds or Int8Embedding in kinds else None


def check_mode(mode: str, group_size: int = 128) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if group_size not in INT4_GROUPS:
        raise UsageError(f"int4 group size {group_size} is not one of {INT4_GROUPS}")


def quantize(model: PaliGemma, mode: str = "int8", kernels: CpuKernels = PLAIN, group_size: int = 128) -> nn.Module:
    """Quantize the decoder of a loaded PaliGemma in place (see the module docstring); returns the model.
    `kernels`: the CPU kernels the quantized layers compute with; `group_size` (int4): weights per scale.
    `load_quantized` makes the same model from a checkpoint directory without holding the float decoder."""
    check_mode(mode, group_size)
    if quantized_mode(model):
        raise ValueError(f"the model is already quantized ({quantized_mode(model)})")
    embedding = model.decoder.embed_tokens
    linears, moes = targets(model)
    for moe in moes.values():
        moe.experts = quantize_experts(moe.experts, mode, group_size, kernels)
    for parent, attr in linears.values():
        float_module = getattr(parent, attr)
        weight = float_module.weight
        setattr(parent, attr, quantized_module(weight, float_module is embedding, mode, group_size, weight.dtype, kernels))
        del float_module, weight  # the float weight is dropped here, layer by layer
    # The float parameters left (vision tower, projector, norms) may still be views of the memory-mapped
    # checkpoint, which keeps the whole mapping, and every page quantization read, resident. Copying them
    # lets the mapping go: on the 3B, resident memory falls from 8.0 to 3.7 GB after loading.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing where there is none). The freed
    temporaries of quantizing weight after weight stayed in the heap and in the peak RSS: the 3B's int8 load peaked at
    1.08-1.16x the model (+ baseline) from one run to the next, and at 1.035 with this after every weight."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load_quantized(path: str | Path, mode: str = "int8", dtype: torch.dtype | str = torch.bfloat16,
                   device: str | torch.device = "cpu", use_sliding_window: bool = True, progress: bool = False,
                   group_size: int = 128, kernels: CpuKernels = PLAIN) -> PaliGemma:
    """Read a checkpoint directory with its decoder quantized as it is read: bit for bit the model that
    `quantize(PaliGemma.from_pretrained(path, dtype), mode)` makes, without the float decoder in memory.

    Each decoder weight is read CHUNK weights at a time (pread, not the memory map: hf_checkpoint.load_into), converted
    to `dtype` and quantized (a mixture of experts' fused weights, expert by expert); the other tensors (vision
    tower, projector, norms) are read into memory of their own.
    The peak is then about the quantized model plus one weight in flight, where quantizing a loaded model holds
    the whole float checkpoint for a while (BENCHMARKS.md: the 3B's int8 and int4 loads).
    """
    check_mode(mode, group_size)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    path = checkpoint_dir(path)
    config = PaliGemmaConfig.from_pretrained(path).replace(use_sliding_window=use_sliding_window)
    with torch.device("meta"):
        model = PaliGemma(config)
    linears, moes = targets(model)
    weights = {f"{name}.weight": (name, parent, attr) for name, (parent, attr) in linears.items()}
    experts = {f"{name}.{w}": (name, moe, w) for name, moe in moes.items() for w in EXPERT_SCALES}
    embedding, pending = model.decoder.embed_tokens, {}  # pending: an Experts' quantized buffers until it has all

    def convert(key: str, rows: Rows) -> dict[str, torch.Tensor] | None:
        if key in experts:
            name, moe, w = experts[key]
            q, scales = (t.to(device) for t in quantize_expert_weight(rows, mode, group_size, dtype))
            buffers = pending.setdefault(name, {})
            buffers.update({w: q, EXPERT_SCALES[w]: scales})
            if len(buffers) == 2 * len(EXPERT_SCALES):
                moe.experts = FastExperts(moe.experts, kernels, quantized=pending.pop(name))
            return {f"{name}.{w}": q, f"{name}.{EXPERT_SCALES[w]}": scales}
        if key not in weights:
            return None  # read as it is
        name, parent, attr = weights[key]
        module = quantized_module(rows, getattr(parent, attr) is embedding, mode, group_size, dtype, kernels).to(device)
        setattr(parent, attr, module)
        release_freed_memory()
        return {f"{name}.{buffer}": t for buffer, t in module.state_dict().items()}

    load_into(model, path, dtype, device, progress, convert=convert)
    return model
