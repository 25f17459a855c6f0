"""A static, preallocated KV cache (gpt-fast style): written in place at given slots, never grown.

Only the kv heads of multi-query / grouped-query attention are stored, in the model dtype: k[layer] and
v[layer] of shape (B, KV, S, D), one tensor per layer, as gpt-fast keeps them: a compiled decode step writes a
layer's new slot in place, where slices of one (layers, ...) tensor would be copied and written back whole every
step. Slots are indices along S; which slots hold real tokens is tracked by the caller (decode.py), which builds
the attention mask over all S slots.
"""

from __future__ import annotations

import torch

from nanopali.config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    @classmethod
    def like(cls, other: "KVCache", batch: int, max_len: int) -> "KVCache":
        """An empty cache of `other`'s layers, heads, dtype and device, for `batch` rows of `max_len` slots."""
        cache = cls.__new__(cls)
        _, KV, _, D = other.k[0].shape
        cache.k = [other.k[0].new_zeros(batch, KV, max_len, D) for _ in other.k]
        cache.v = [other.k[0].new_zeros(batch, KV, max_len, D) for _ in other.v]
        return cache

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at slots (T,); return the layer's whole cache (B, KV, S, D)."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B,) in that order (beam search)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
