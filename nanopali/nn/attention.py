"""Scaled dot-product attention shared by the SigLIP tower and the Gemma decoder.

One function, two paths: PyTorch's fused SDPA when there is no logit soft-cap (SigLIP, Gemma 1),
and the explicit softmax(tanh(q·kᵀ·s / c)·c + mask) path that Gemma 2's soft-cap needs (SDPA has
no soft-cap). Multi-query / grouped-query attention never copies the kv heads: queries are grouped
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
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=KV != H)
    q = q.view(B, KV, H // KV, T, D)                                   # (B, KV, G, T, D)
    scores = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, KV, G, T, S)
    scores = torch.tanh(scores / softcap) * softcap                     # soft-cap before the mask
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v.unsqueeze(2)).view(B, H, T, D)
