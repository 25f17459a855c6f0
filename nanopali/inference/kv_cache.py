"""A static, preallocated KV cache (gpt-fast style): written in place at given slots, never grown.

Only the kv heads of multi-query / grouped-query attention are stored, in the model dtype:
k, v of shape (layers, B, KV, S, D). Slots are indices along S; which slots hold real tokens is
tracked by the caller (generate.py), which builds the attention mask over all S slots.
"""

from __future__ import annotations

import torch

from nanopali.config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def like(cls, other: "KVCache", batch: int, max_len: int) -> "KVCache":
        """An empty cache of `other`'s layers, heads, dtype and device, for `batch` rows of `max_len` slots."""
        cache = cls.__new__(cls)
        L, _, KV, _, D = other.k.shape
        cache.k = other.k.new_zeros(L, batch, KV, max_len, D)
        cache.v = torch.zeros_like(cache.k)
        return cache

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at slots (T,); return the layer's whole cache (B, KV, S, D)."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B,) in that order (beam search)."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
