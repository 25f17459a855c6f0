"""SigLIP vision tower: image (B, 3, S, S) -> patch features (B, N, D), N = (S / patch)^2.

A plain pre-LayerNorm ViT as in big_vision's `vit.py` (PaliGemma variant): Conv2d patch embedding
with stride = patch size, learned position embeddings (no CLS token), bidirectional multi-head
attention with biases, fc1 -> gelu(tanh) -> fc2 MLP (nn/mlp.py), and a final LayerNorm. No pooling head.
Parameter names follow the Hugging Face `SiglipVisionTransformer` keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from nanopali.config import VisionConfig
from nanopali.nn.attention import attention
from nanopali.nn.mlp import GeluMLP


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)                                              # (B, N, D)
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v)                                                   # (B, H, N, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, -1))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # recompute each layer in backward instead of storing activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class SiglipVisionModel(nn.Module):
    """pixel_values float (B, 3, S, S), normalised to [-1, 1] -> features (B, N, D)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.config.num_channels, S, S):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this model takes (B, {self.config.num_channels}, {S}, {S})")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
