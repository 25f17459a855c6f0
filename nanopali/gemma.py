"""The Gemma decoder, one module for Gemma 1 (PaliGemma) and Gemma 2 (PaliGemma 2).

Follows big_vision's `models/ppp/gemma.py`, which also covers both generations with flags:
RMSNorm in fp32 as x·rsqrt(mean(x²)+eps)·(1+w), RoPE with split-half rotation, multi-query /
grouped-query attention with head_dim independent of hidden/heads, GeGLU MLP with tanh-gelu, token
embeddings scaled by sqrt(hidden) (the scale rounded to the activation dtype) and tied to the output
head. Gemma 2 adds (TextConfig flags): post-attention and post-MLP norms, attention scale
query_pre_attn_scalar^-0.5, attention and final logit soft-caps, and sliding-window layers.

Not here: the attention mask (masks.py), the image embeddings (model.py), the KV cache
(kv_cache.py), the fast inference kernels (fast.py: `Linear` and `Embedding.attend` for single-row
products, RMSNorm and the GeGLU for large tensors, all without autograd). Parameter names follow the
Hugging Face `GemmaModel` / `Gemma2Model` keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import fast
from .attention import attend
from .config import TextConfig


class Linear(nn.Linear):
    """nn.Linear (same parameters) whose single-row inference products take fast.py's compiled kernel."""

    fast = True  # fast.enable(model, False) turns the kernel off

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and self.fast and fast.uses_kernel(x, self.weight):
            return fast.linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """The token embedding, which is also the tied output head (`attend`)."""

    fast = True

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., vocab_size) = h @ weightᵀ."""
        return fast.linear(h, self.weight, fast=self.fast)


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²)+eps)·(1+w) in fp32 (fast.rms_norm: one compiled pass for large inference inputs)."""

    fast = True

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # Gemma stores w with the norm as (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast.rms_norm(x, self.weight, self.eps, fast=self.fast)


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T), split-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq            # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]           # (B, 1, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GemmaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, slots)                           # (B, KV, S, D)
        out = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)            # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class GemmaMLP(nn.Module):
    fast = True  # GeGLU's gelu(gate)·up in one compiled pass for large inference inputs (fast.gelu)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fast.gelu(self.gate_proj(x), self.up_proj(x), fast=self.fast))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.post_norms = cfg.post_norms
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        # Gemma 1 calls its pre-MLP norm "post_attention_layernorm"; Gemma 2 uses that name for the
        # norm after attention and has separate pre/post feed-forward norms.
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
        if self.post_norms:
            h = self.post_attention_layernorm(h)
        x = x + h
        pre_mlp_norm = self.pre_feedforward_layernorm if self.post_norms else self.post_attention_layernorm
        h = self.mlp(pre_mlp_norm(x))
        if self.post_norms:
            h = self.post_feedforward_layernorm(h)
        return x + h


class GemmaDecoder(nn.Module):
    """Embeddings (B, T, D) + positions (B, T) + masks -> final hidden states (B, T, D)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # recompute each layer in backward instead of storing activations

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                                             # (B, T, D)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def forward(
        self,
        x: torch.Tensor,                        # (B, T, D) input embeddings
        positions: torch.Tensor,                # long (B, T) RoPE positions
        masks: dict[int | None, torch.Tensor],  # window (None = global) -> bool (B, 1, T, S)
        cache=None,                             # KVCache or None
        slots: torch.Tensor | None = None,      # long (T,) cache slots that x is written to
    ) -> torch.Tensor:
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, masks[self.config.window(i)], cache, slots)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output head (B, T, D) -> (B, T, vocab_size), with Gemma 2's final soft-cap."""
        logits = self.embed_tokens.attend(h)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def windows(self) -> set[int | None]:
        """The distinct attention windows of the layers (None = global): one mask is built for each."""
        return {self.config.window(i) for i in range(self.config.num_hidden_layers)}
