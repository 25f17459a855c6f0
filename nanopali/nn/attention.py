"""Scaled dot-product attention shared by the SigLIP tower and the Gemma decoder.

One function, two paths: PyTorch's fused SDPA when there is no logit soft-cap (SigLIP, Gemma 1),
and the explicit softmax(tanh(q·kᵀ·s / c)·c + mask) path that Gemma 2's soft-cap needs (SDPA has
no soft-cap). A decode step's single query row on the CPU takes the explicit path too, in fp32 (as SDPA
accumulates): SDPA's CPU kernel spends 0.5-1.7 ms on it where the two products take 0.07-0.2 (BENCHMARKS.md). Multi-query / grouped-query attention never copies the kv heads: queries are grouped
onto them instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,                   # (B, H, T, D)
    k: torch.Tensor,                   # (B, KV, S, D), H % KV == 0
    v: torch.Tensor,                   # (B, KV, S, D)
    mask: torch.Tensor | None = None,  # bool (B, 1, T, S), True = may attend
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:                     # (B, H, T, D)
    B, H, T, D = q.shape
    KV = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    one_row = T == 1 and q.device.type == "cpu"
    if softcap is None and not one_row:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=KV != H)
    dtype = q.dtype if softcap is not None else torch.float32           # Gemma 2 as transformers computes it
    out_dtype, q = q.dtype, q.view(B, KV, H // KV, T, D).to(dtype)      # (B, KV, G, T, D)
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2).to(dtype)) * scale  # (B, KV, G, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap                 # soft-cap before the mask
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(dtype)
    return torch.matmul(probs, v.unsqueeze(2).to(dtype)).to(out_dtype).view(B, H, T, D)
