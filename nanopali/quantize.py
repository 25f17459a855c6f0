"""Weight-only int8 / int4 quantization of the Gemma decoder for inference, applied after loading.

    model = PaliGemma.from_pretrained(path, dtype=torch.bfloat16, quantize="int8")   # or quantize(model, "int8")
    model = PaliGemma.from_pretrained(path, dtype=torch.bfloat16, quantize="int4")   # group-wise, 128 per group

Every decoder linear layer (q/k/v/o, gate/up/down) and the token embedding, which is also the tied
output head, are replaced by int8 weights with one fp32 scale per output channel (per vocabulary row
for the embedding): scale = max|w| / 127 over the row, w8 = round(w / scale), so w ≈ w8 · scale.
Activations stay in the model dtype. A decode step reads 1 byte per weight instead of 2: for batch 1
through fast.py's compiled loop, which applies the scales to the outputs, or torch's `_weight_int8pack_mm`,
whichever gave the faster decode steps on this machine (fast.StepChooser); batches up to fast.MAX_ROWS
through `_weight_int8pack_mm`; prefill (more rows) dequantizes one matrix at a time into a reused buffer
and runs F.linear. The SigLIP tower and the projector stay as they are: they run once per image, in the
compute-bound prefill.

int4 quantizes the same linear layers group-wise, as gpt-fast does: each run of G (128) weights along
the input dimension gets its own fp scale and zero, w ≈ (q - 8) · scale + zero with q in 0..15, packed
two per byte in the layout of torch's `_weight_int4pack_mm_for_cpu` (fast.linear_int4). The token
embedding / output head stays int8: its rows are looked up, and half a byte more per head weight is
0.26 GB of the 3B's 1.5 GB read per token. A layer whose sizes the kernel cannot take (input size not a
multiple of 32, output size not a multiple of 16) stays int8; G shrinks to 64 or 32 where it does not
divide the input size.

Quantized modules hold int8 or packed int4 buffers (`weight`, `scale` or `scales_and_zeros`), so a quantized model is
for inference only: `save_pretrained` refuses it (load the checkpoint again without quantize= to
save), and it has no trainable decoder weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fast

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

    fast = True

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free layers only (the Gemma decoder's)")
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast.linear(x, self.weight, self.scale, fast=self.fast)

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


class Int4Linear(nn.Module):
    """A bias-free linear layer with group-wise int4 weights, packed as torch's CPU int4 kernel wants them."""

    fast = True

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int4Linear quantizes bias-free layers only (the Gemma decoder's)")
        N, K = linear.weight.shape
        q, scales_and_zeros = quantize_groups(linear.weight, group)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        if not torch.equal(fast.unpack_int4(packed, N, K), q.to(torch.uint8)):
            raise RuntimeError(f"torch {torch.__version__} packs int4 weights in a layout fast.unpack_int4 does "
                               "not know; int4 is not supported with this torch (use int8)")
        self.register_buffer("weight", packed)                                   # uint8 (N, K / 2)
        # in the layer's dtype, as the kernel wants them (bf16 for a bf16 model)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(linear.weight.dtype))
        self.in_features, self.out_features, self.group = K, N, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast.linear_int4(x, self.weight, self.scales_and_zeros, fast=self.fast)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"


class Int8Embedding(nn.Module):
    """The token embedding / tied output head with int8 rows (V, D) and one scale per row (V,)."""

    fast = True

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        q, scale = quantize_rows(embedding.weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.dtype = embedding.weight.dtype  # the dtype looked-up rows come back in

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> rows (B, T, D) in the original dtype."""
        return (F.embedding(input_ids, self.weight).float() * self.scale[input_ids][..., None]).to(self.dtype)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., V)."""
        return fast.linear(h, self.weight, self.scale, fast=self.fast)


def _quantized_linear(linear: nn.Linear, mode: str, group_size: int) -> nn.Module:
    group = int4_group(*linear.weight.shape, preferred=group_size) if mode == "int4" else None
    return Int8Linear(linear) if group is None else Int4Linear(linear, group)


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 128) -> nn.Module:
    """Quantize the decoder of a PaliGemma in place (see the module docstring); returns the model.
    `group_size` (int4 only): weights per scale along a row, one of INT4_GROUPS."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if group_size not in INT4_GROUPS:
        raise ValueError(f"int4 group size {group_size} is not one of {INT4_GROUPS}")
    if getattr(model, "quantized", None):
        raise ValueError(f"the model is already quantized ({model.quantized})")
    decoder = model.decoder
    for layer in decoder.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _quantized_linear(child, mode, group_size))  # the float weight is dropped here, layer by layer
    decoder.embed_tokens = Int8Embedding(decoder.embed_tokens)
    # The float parameters left (vision tower, projector, norms) may still be views of the memory-mapped
    # checkpoint, which keeps the whole mapping, and every page quantization read, resident. Copying them
    # lets the mapping go: on the 3B, resident memory falls from 8.0 to 3.7 GB after loading.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    model.quantized = mode
    model.step_chooser = fast.StepChooser(model.step_chooser.measure)  # other weight dtypes: measured anew
    return model
