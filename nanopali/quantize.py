"""Weight-only int8 quantization of the Gemma decoder for inference, applied after loading.

    model = PaliGemma.from_pretrained(path, dtype=torch.bfloat16, quantize="int8")   # or quantize(model, "int8")

Every decoder linear layer (q/k/v/o, gate/up/down) and the token embedding, which is also the tied
output head, are replaced by int8 weights with one fp32 scale per output channel (per vocabulary row
for the embedding): scale = max|w| / 127 over the row, w8 = round(w / scale), so w ≈ w8 · scale.
Activations stay in the model dtype. A decode step reads 1 byte per weight instead of 2: through
fast.py's compiled loop, which applies the scales to the outputs (batch 1), or torch's
`_weight_int8pack_mm` (the long-row down projection, batches up to fast.MAX_ROWS); prefill (more
rows) dequantizes one matrix at a time and runs F.linear. The SigLIP tower and the projector stay as they
are: they run once per image, in the compute-bound prefill.

Quantized modules hold int8 buffers under new names (`weight`, `scale`), so a quantized model is
for inference only: `save_pretrained` refuses it (load the checkpoint again without quantize= to
save), and it has no trainable decoder weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fast

MODES = ("int8",)


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


def quantize(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantize the decoder of a PaliGemma in place (see the module docstring); returns the model."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if getattr(model, "quantized", None):
        raise ValueError(f"the model is already quantized ({model.quantized})")
    decoder = model.decoder
    for layer in decoder.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))  # the float weight is dropped here, layer by layer
    decoder.embed_tokens = Int8Embedding(decoder.embed_tokens)
    # The float parameters left (vision tower, projector, norms) may still be views of the memory-mapped
    # checkpoint, which keeps the whole mapping, and every page quantization read, resident. Copying them
    # lets the mapping go: on the 3B, resident memory falls from 8.0 to 3.7 GB after loading.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    model.quantized = mode
    return model
