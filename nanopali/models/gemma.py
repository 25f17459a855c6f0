"""The Gemma decoder, one module for Gemma 1 (PaliGemma) and Gemma 2 (PaliGemma 2).

Follows big_vision's `models/ppp/gemma.py`, which also covers both generations with flags: RMSNorm
(nn/norms.py), RoPE (nn/rope.py), multi-query / grouped-query attention with head_dim independent of
hidden/heads, the GeGLU MLP (nn/mlp.py), token embeddings scaled by sqrt(hidden) (the scale rounded to
the activation dtype) and tied to the output head. The MLP class is chosen by the config, as litgpt chooses
its MLP: layers the config makes sparse (`num_local_experts` > 0) have the mixture-of-experts MLP (nn/moe.py)
in the same place, `mlp`; with no experts the decoder is the dense one, parameter for parameter. Gemma 2
adds (TextConfig flags): post-attention and post-MLP norms, attention scale query_pre_attn_scalar^-0.5,
attention and final logit soft-caps, and sliding-window layers.

Not here: the attention mask (nn/masks.py), the image embeddings (paligemma.py), the KV cache and any
inference speed-up (nanopali/inference/). Parameter names follow the Hugging Face `GemmaModel` /
`Gemma2Model` keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanopali.config import TextConfig
from nanopali.nn.attention import attention
from nanopali.nn.mlp import GeGLU
from nanopali.nn.moe import SparseMoE
from nanopali.nn.norms import RMSNorm
from nanopali.nn.rope import apply_rope, rope


class TiedEmbedding(nn.Embedding):
    """The token embedding, which Gemma also uses as its output head."""

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits (..., vocab_size) = h @ weightᵀ."""
        return F.linear(h, self.weight)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.attend = attention  # nn.attention's; the inference layer may put a faster one of the same signature here

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, slots)                           # (B, KV, S, D)
        out = self.attend(q, k, v, mask, scale=self.scale, softcap=self.softcap)       # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def feed_forward(cfg: TextConfig, layer_idx: int) -> nn.Module:
    """The layer's MLP: GeGLU, or SparseMoE in the layers cfg.is_moe_layer names (same place: `mlp`)."""
    if not cfg.is_moe_layer(layer_idx):
        return GeGLU(cfg.hidden_size, cfg.intermediate_size)
    return SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size, cfg.num_local_experts,
                     cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.router_jitter_noise, cfg.router_noisy_topk,
                     cfg.shared_expert_intermediate_size)


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
        self.mlp = feed_forward(cfg, layer_idx)

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
        self.embed_tokens = TiedEmbedding(cfg.vocab_size, cfg.hidden_size)
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
        cache=None,                             # a KV cache (inference/kv_cache.py) or None
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
        logits = self.embed_tokens.unembed(h)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def router_logits(self) -> list[torch.Tensor]:
        """The router logits (B·T, E) of each sparse layer in the last forward (none for a dense decoder)."""
        return [layer.mlp.router_logits for i, layer in enumerate(self.layers) if self.config.is_moe_layer(i)]

    @property
    def windows(self) -> set[int | None]:
        """The distinct attention windows of the layers (None = global): one mask is built for each."""
        return {self.config.window(i) for i in range(self.config.num_hidden_layers)}
