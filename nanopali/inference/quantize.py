"""Weight-only int8 / int4 quantization of the Gemma decoder, a transform applied to a loaded model.

    runtime = nanopali.inference.prepare(model, quantize="int8")   # or quantize(model, "int8", kernels)

int8: every decoder linear layer (q/k/v/o, gate/up/down) and the token embedding, which is also the
tied output head, get int8 weights with one fp32 scale per output channel (per vocabulary row for the
embedding): scale = max|w| / 127, w ≈ round(w / scale) · scale. Activations stay in the model dtype.
int4: the same linear layers group-wise, as gpt-fast does: each run of G (128) weights along the input
gets its own scale and zero, w ≈ (q - 8) · scale + zero, q in 0..15, packed two per byte as torch's
`_weight_int4pack_mm_for_cpu` wants; the embedding stays int8, and a layer the kernel cannot take stays int8.
A mixture-of-experts layer's experts are quantized the same way, each expert matrix on its own (int8 per
row; int4 per group, packed expert by expert), into a cpu_kernels.FastExperts; its router (`gate`) stays in
float, since a rounded router picks other experts. The products run through cpu_kernels.CpuKernels. The SigLIP
tower and the projector are not quantized: they run once per image. A quantized model is for inference only:
`save_pretrained` refuses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopali.errors import UsageError
from nanopali.inference.cpu_kernels import PLAIN, CpuKernels, FastExperts, unpack_int4
from nanopali.models.paligemma import PaliGemma
from nanopali.nn.moe import Experts, SparseMoE

MODES = ("int8", "int4")
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 kernel takes


def quantize_rows(weight: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (int8 (N, K), fp32 scale (N,)) with weight ≈ int8 · scale[:, None].

    Works `chunk` rows at a time, so the fp32 temporaries stay small (the 257216-row embedding
    would otherwise need several GB of them).
    """
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    for start in range(0, N, chunk):
        w = weight[start:start + chunk].detach().float()                     # (chunk, K)
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[start:start + chunk] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[start:start + chunk] = s
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights (N, K) and per-output-channel scales (N,)."""

    def __init__(self, linear: nn.Linear, kernels: CpuKernels = PLAIN):
        super().__init__()
        self.kernels = kernels
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free layers only (the Gemma decoder's)")
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int4_group(N: int, K: int, preferred: int = 128) -> int | None:
    """The group size an (N, K) weight gets: the largest kernel-supported size <= preferred dividing K (None: stays int8)."""
    if N % 16:
        return None
    return next((g for g in INT4_GROUPS if g <= preferred and K % g == 0), None)


def quantize_groups(weight: torch.Tensor, group: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (int32 q (N, K) in 0..15, fp32 scales and zeros (K / group, N, 2)) with
    weight ≈ (q - 8) · scale + zero per run of `group` weights of a row (min -> 0, max -> 15)."""
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int32, device=weight.device)
    scales_and_zeros = torch.empty(K // group, N, 2, dtype=torch.float32, device=weight.device)
    for start in range(0, N, chunk):
        w = weight[start:start + chunk].detach().float().view(-1, K // group, group)  # (chunk, K/G, G)
        lo, hi = w.amin(-1), w.amax(-1)                                                # (chunk, K/G)
        scale = (hi - lo).clamp(min=1e-12) / 15
        q[start:start + chunk] = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).view(-1, K).int()
        scales_and_zeros[:, start:start + chunk] = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1)
    return q, scales_and_zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int32 (N, K) in 0..15 -> uint8 (N, K / 2) as torch's CPU int4 kernel wants it, checked to unpack to q."""
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    if not torch.equal(unpack_int4(packed, *q.shape), q.to(torch.uint8)):
        raise RuntimeError(f"torch {torch.__version__} packs int4 weights in a layout cpu_kernels.unpack_int4 does "
                           "not know; int4 is not supported with this torch (use int8)")
    return packed


class Int4Linear(nn.Module):
    """A bias-free linear layer with group-wise int4 weights, packed as torch's CPU int4 kernel wants them."""

    def __init__(self, linear: nn.Linear, group: int, kernels: CpuKernels = PLAIN):
        super().__init__()
        self.kernels = kernels
        if linear.bias is not None:
            raise ValueError("Int4Linear quantizes bias-free layers only (the Gemma decoder's)")
        N, K = linear.weight.shape
        q, scales_and_zeros = quantize_groups(linear.weight, group)
        self.register_buffer("weight", pack_int4(q))                             # uint8 (N, K / 2)
        # in the layer's dtype, as the kernel wants them (bf16 for a bf16 model)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(linear.weight.dtype))
        self.in_features, self.out_features, self.group = K, N, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int4(x, self.weight, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"


class Int8Embedding(nn.Module):
    """The token embedding / tied output head with int8 rows (V, D) and one scale per row (V,)."""

    def __init__(self, embedding: nn.Embedding, kernels: CpuKernels = PLAIN):
        super().__init__()
        self.kernels = kernels
        q, scale = quantize_rows(embedding.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.dtype = embedding.weight.dtype  # the dtype looked-up rows come back in

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> rows (B, T, D) in the original dtype."""
        return (F.embedding(input_ids, self.weight).float() * self.scale[input_ids][..., None]).to(self.dtype)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., V)."""
        return self.kernels.linear(h, self.weight, self.scale)


def quantize_experts(experts: Experts, mode: str, group_size: int, kernels: CpuKernels) -> FastExperts:
    """A mixture of experts' fused (E, N, K) weights, each expert matrix quantized as a linear layer's would be."""
    buffers = {}
    for name, scale in (("gate_up_proj", "gate_up_scale"), ("down_proj", "down_scale")):
        weight = getattr(experts, name).detach()
        E, N, K = weight.shape
        group = int4_group(N, K, preferred=group_size) if mode == "int4" else None
        if group is None:
            q, s = quantize_rows(weight.reshape(E * N, K))
            buffers[name], buffers[scale] = q.view(E, N, K), s.view(E, N)
            continue
        packed, scales = [], []
        for w in weight:
            q, scales_and_zeros = quantize_groups(w, group)
            packed.append(pack_int4(q))
            scales.append(scales_and_zeros.to(weight.dtype))
        buffers[name], buffers[scale] = torch.stack(packed), torch.stack(scales)   # (E, N, K/2), (E, K/G, N, 2)
    return FastExperts(experts, kernels, quantized=buffers)


def _quantized_linear(linear: nn.Linear, mode: str, group_size: int, kernels: CpuKernels) -> nn.Module:
    group = int4_group(*linear.weight.shape, preferred=group_size) if mode == "int4" else None
    return Int8Linear(linear, kernels) if group is None else Int4Linear(linear, group, kernels)


def quantized_mode(model: PaliGemma) -> str | None:
    """"int8" or "int4" if the model's decoder was quantized (an int4 model has int8 layers too), else None."""
    kinds = {type(m) for m in model.decoder.modules()}
    return "int4" if Int4Linear in kinds else "int8" if Int8Linear in kinds or Int8Embedding in kinds else None


def quantize(model: PaliGemma, mode: str = "int8", kernels: CpuKernels = PLAIN, group_size: int = 128) -> nn.Module:
    """Quantize the decoder of a PaliGemma in place (see the module docstring); returns the model.
    `kernels`: the CPU kernels the quantized layers compute with; `group_size` (int4): weights per scale."""
    if mode not in MODES:
        raise UsageError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if group_size not in INT4_GROUPS:
        raise UsageError(f"int4 group size {group_size} is not one of {INT4_GROUPS}")
    if quantized_mode(model):
        raise ValueError(f"the model is already quantized ({quantized_mode(model)})")
    decoder = model.decoder
    for layer in decoder.layers:
        parents = [layer.self_attn, layer.mlp]
        if isinstance(layer.mlp, SparseMoE):  # experts as a whole, the shared expert's linears; the router stays float
            layer.mlp.experts = quantize_experts(layer.mlp.experts, mode, group_size, kernels)
            parents[1:] = [layer.mlp.shared_expert] if layer.mlp.shared_expert is not None else []
        for parent in parents:
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantized_linear(child, mode, group_size, kernels))  # the float weight is dropped here, layer by layer
    decoder.embed_tokens = Int8Embedding(decoder.embed_tokens, kernels)
    # The float parameters left (vision tower, projector, norms) may still be views of the memory-mapped
    # checkpoint, which keeps the whole mapping, and every page quantization read, resident. Copying them
    # lets the mapping go: on the 3B, resident memory falls from 8.0 to 3.7 GB after loading.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model
