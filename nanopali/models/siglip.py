"""SigLIP's two towers on one encoder: the vision tower (PaliGemma's, optionally with its pooling head) and the text tower.

Both are the pre-LayerNorm transformer encoder of big_vision's `vit.py` / `text_transformer.py`: bidirectional
multi-head attention with biases (nn/attention.py), an fc1 -> gelu(tanh) -> fc2 MLP (nn/mlp.py), LayerNorm before
each block and after the last one. They differ only in what goes in and what comes out:

    vision  image (B, 3, S, S) --Conv2d patches + learned positions--> encoder --> tokens (B, N, D)    (PaliGemma)
            tokens --attention pooling (MAP: a learned probe attends to the tokens, + LayerNorm/MLP)--> (B, D)
    text    ids (B, L) --token + learned position embeddings--> encoder --> final norm --> last position --> Linear (B, P)

The text is always padded to the length it was trained with (L = 64) and its *last* position is pooled, so the
pooled token is a pad for any text shorter than L: that is how SigLIP was trained (big_vision attends to the
pads too), and why the text tower refuses another length. Parameter names are the Hugging Face
`SiglipVisionModel` / `SiglipTextModel` keys (the pooling head is torch's nn.MultiheadAttention, as there).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from nanopali.config import VisionConfig
from nanopali.errors import UsageError
from nanopali.nn.attention import attention
from nanopali.nn.mlp import GeluMLP
from nanopali.siglip_config import SiglipTextConfig


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig | SiglipTextConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, mask)                                             # (B, H, N, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, -1))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig | SiglipTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """The layers both towers share: (B, N, D) -> (B, N, D); `mask` bool (B, 1, N, N), True = may attend."""

    def __init__(self, cfg: VisionConfig | SiglipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # recompute each layer in backward instead of storing activations

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


# ---------------------------------------------------------------------------------------------- vision


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)                                              # (B, N, D)
        return x + self.position_embedding.weight


class AttentionPoolingHead(nn.Module):
    """MAP pooling (big_vision's `MAPHead`): one learned probe attends to the tokens, then a residual LayerNorm+MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        probe = self.probe.expand(tokens.shape[0], -1, -1)                            # (B, 1, D)
        x = self.attention(probe, tokens, tokens, need_weights=False)[0]
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class SiglipVisionModel(nn.Module):
    """pixel_values float (B, 3, S, S), normalised to [-1, 1] -> tokens (B, N, D); `pooled` -> (B, D) with the head."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.vision_use_head:
            self.head = AttentionPoolingHead(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.config.num_channels, S, S):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this model takes (B, {self.config.num_channels}, {S}, {S})")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self(pixel_values))


# ---------------------------------------------------------------------------------------------- text


class SiglipTextEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class SiglipTextModel(nn.Module):
    """input_ids (B, L), L = max_position_embeddings -> tokens (B, L, D) after the final norm; `pooled` -> (B, P)."""

    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipTextEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask` (B, L), 1 = real token, keeps queries from attending to pads. SigLIP was trained
        without one (every position attends to every other, pads included), so leave it None to match training;
        transformers applies it when given, and so does this, for comparisons."""
        self.check_ids(input_ids)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise UsageError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                 f"{tuple(input_ids.shape)}")
            mask = attention_mask.bool()[:, None, None, :]                          # (B, 1, 1, L): keys
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids), mask))

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self(input_ids, attention_mask)[:, -1])

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """A UsageError for ids that are not (B, L) integers of the vocabulary, L the trained text length."""
        L, V = self.config.max_position_embeddings, self.config.vocab_size
        if input_ids.ndim != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise UsageError(f"input_ids must be an integer tensor (batch, {L}), got {input_ids.dtype} of shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] != L:
            raise UsageError(f"input_ids have length {input_ids.shape[1]}; SigLIP's text tower takes texts padded to "
                             f"exactly {L} tokens (it pools the last position, which must be where training put it): "
                             "use SigLIPProcessor, which pads every text to that length")
        outside = (input_ids < 0) | (input_ids >= V)
        if outside.any():
            row, col = outside.nonzero()[0].tolist()
            raise UsageError(f"token id {int(input_ids[row, col])} at row {row}, position {col} of input_ids is outside "
                             f"the text vocabulary (ids 0..{V - 1})")
