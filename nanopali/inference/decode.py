"""Cached decoding mechanics: prefill the prefix into a static KV cache, then one token per row per step.

    logits, state = prefill(model, input_ids, pixel_values, attention_mask, token_type_ids, runtime=...)
    logits = state.step(model, tokens)                 # (B,) -> next-token logits (B, V) in float32

The prefix (image + <bos> + prompt + "\\n") is run once with bidirectional prefix attention; every
generated token is a causal suffix token. All masks come from nn.masks.prefix_lm_mask over the cache
slots, so the decode step has static shapes (B, 1, 1, S): on CUDA it is replayed as a CUDA graph
(cuda_graph.py), compiled first if the runtime says so (compiled.py), on CPU it runs on the path the runtime's
kernels chose (runtime.py). Padding may be on
either side: the first new token is predicted from each row's last real token and positions count real
tokens only. Strategies (greedy, sampling, beams) live in generate.py / beam.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanopali.errors import UsageError
from nanopali.inference.cuda_graph import GraphedStep, capture
from nanopali.inference.kv_cache import KVCache
from nanopali.inference.runtime import Runtime
from nanopali.models.paligemma import PaliGemma
from nanopali.nn.masks import positions_of, prefix_lm_inputs, prefix_lm_mask


@dataclass
class DecodeState:
    """Everything the decode step needs besides the model: the cache and what each slot holds."""

    cache: KVCache
    kv_valid: torch.Tensor   # bool (B, S): slot holds a real token
    kv_prefix: torch.Tensor  # bool (B, S): slot holds a prefix token
    kv_pos: torch.Tensor     # long (B, S): RoPE position of each slot's token
    positions: torch.Tensor  # long (B,): RoPE position of the next token
    slot: int                # next free slot (shared by all rows)
    runtime: Runtime = field(default_factory=Runtime)
    cuda_graph: bool = False             # replay the step as a CUDA graph (prefill sets it on CUDA)
    graph: GraphedStep | None = None     # captured at the first step

    def step(self, model: PaliGemma, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B,) as suffix tokens; return the next-token logits (B, V) in float32."""
        if self.slot >= self.cache.max_len:
            raise RuntimeError(f"KV cache full ({self.cache.max_len} slots)")
        slots = torch.full((1,), self.slot, dtype=torch.long, device=self.kv_valid.device)  # no host-device sync
        self.kv_valid[:, self.slot] = True
        self.kv_pos[:, self.slot] = self.positions
        masks = {w: prefix_lm_mask(self.kv_valid, self.kv_prefix, self.kv_pos, slots, w) for w in model.decoder.windows}
        inputs = (tokens, self.positions, masks, slots)
        graphed = self.cuda_graph and not torch.is_grad_enabled()  # a graph replays no autograd history
        run = self.runtime.step_function(decode_step)  # decode_step, or compiled (runtime.compile)
        if graphed and self.graph is None:
            self.graph = capture(self.runtime, lambda *args: run(model, self.cache, *args), *inputs)
            self.cuda_graph = self.graph is not None
        if graphed and self.graph is not None:
            logits = self.graph(*inputs)
        else:
            logits = self.runtime.run_step(lambda: run(model, self.cache, *inputs))
        self.positions = self.positions + 1
        self.slot += 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        self.cuda_graph, self.graph = False, None  # new cache tensors: a graph would write to the old ones
        self.cache.reorder(rows)
        self.kv_valid, self.kv_prefix = self.kv_valid[rows], self.kv_prefix[rows]
        self.kv_pos, self.positions = self.kv_pos[rows], self.positions[rows]


def prefill(model: PaliGemma, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None, max_new_tokens: int = 0,
            rows_per_input: int = 1, runtime: Runtime | None = None) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompt through the model, filling a cache with room for max_new_tokens more.

    rows_per_input > 1 repeats every row (beam search) after the prefill. Returns the logits of the
    token after each row's last real token (B * rows_per_input, V) and the decode state.
    """
    attention_mask, token_type_ids = prefix_lm_inputs(input_ids, attention_mask, token_type_ids)
    B, T = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    if not valid.any(-1).all():
        raise UsageError("a row of attention_mask is all zeros: nothing to generate from")
    check_length(model, T, max_new_tokens)
    S = T + max_new_tokens
    kv_valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    kv_valid[:, :T] = valid
    kv_prefix = torch.zeros_like(kv_valid)
    kv_prefix[:, :T] = valid & (token_type_ids == 0)
    x = model.embed(input_ids, pixel_values)
    cache = KVCache(model.decoder.config, B, S, x.dtype, device)
    kv_pos = torch.zeros(B, S, dtype=torch.long, device=device)
    positions = kv_pos[:, :T] = positions_of(attention_mask)
    slots = torch.arange(T, device=device)
    masks = {w: prefix_lm_mask(kv_valid, kv_prefix, kv_pos, slots, w) for w in model.decoder.windows}
    h = model.decoder(x, positions, masks, cache, slots)                      # (B, T, D)
    last = T - 1 - valid.flip(-1).long().argmax(-1)                          # (B,) index of the last real token
    logits = model.decoder.logits(h[torch.arange(B, device=device), last][:, None])[:, -1].float()
    runtime = runtime or Runtime()
    state = DecodeState(cache, kv_valid, kv_prefix, kv_pos, valid.sum(-1) + 1, T, runtime,
                        cuda_graph=device.type == "cuda" and runtime.cuda_graphs and not runtime.cuda_graph_failed)
    if rows_per_input > 1:
        rows = torch.arange(B, device=device).repeat_interleave(rows_per_input)
        state.reorder(rows)
        logits = logits[rows]
    return logits, state


def check_length(model: PaliGemma, prompt_tokens: int, max_new_tokens: int) -> None:
    """UsageError when a prompt of `prompt_tokens` and `max_new_tokens` new tokens need more positions than the
    model has."""
    limit = model.config.text_config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise UsageError(f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
                         f"{prompt_tokens + max_new_tokens} positions, but this model takes at most {limit}")


def relayout(parts: list[tuple[DecodeState, torch.Tensor]], room: int) -> DecodeState:
    """One decode state holding the rows `rows` (long (b,)) of each part's state, in order, with `room` free slots.

    Each part's used slots (from the first slot any of its kept rows holds to its next free slot) are copied
    right-aligned at one shared next slot, as left padding lays out rows of different lengths; a row's RoPE
    positions and prefix/valid flags move with its slots, so the masks (nn/masks.py) and the next logits are
    those of the row alone. Slots no kept row uses are dropped, so the cache holds the rows' own lengths
    (at most prompt + max_new_tokens each), never the time the batch has been running. The continuous
    batch (batching.py) calls this when rows join or leave.
    """
    parts = [(state, rows) for state, rows in parts if len(rows)]
    if not parts:
        raise ValueError("relayout needs at least one row")
    spans = []
    for state, rows in parts:
        used = state.kv_valid[rows, :state.slot].any(0)  # (slot,)
        first = int(used.nonzero()[0, 0]) if used.any() else state.slot
        spans.append(first)
    width = max(state.slot - first for (state, _), first in zip(parts, spans))
    first_state = parts[0][0]
    B, S = sum(len(rows) for _, rows in parts), width + room
    device = first_state.kv_valid.device
    cache = KVCache.like(first_state.cache, B, S)
    kv_valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    kv_prefix, kv_pos = torch.zeros_like(kv_valid), torch.zeros(B, S, dtype=torch.long, device=device)
    positions, b = [], 0
    for (state, rows), first in zip(parts, spans):
        n, src, dst = len(rows), slice(first, state.slot), slice(width - (state.slot - first), width)
        for to, fro in zip(cache.k + cache.v, state.cache.k + state.cache.v):  # each layer's k, then each v
            to[b:b + n, :, dst] = fro[rows, :, src]
        kv_valid[b:b + n, dst] = state.kv_valid[rows, src]
        kv_prefix[b:b + n, dst] = state.kv_prefix[rows, src]
        kv_pos[b:b + n, dst] = state.kv_pos[rows, src]
        positions.append(state.positions[rows])
        b += n
    return DecodeState(cache, kv_valid, kv_prefix, kv_pos, torch.cat(positions), width, first_state.runtime)


def decode_step(model: PaliGemma, cache: KVCache, tokens, positions, masks, slots) -> torch.Tensor:
    """One cached forward: tokens (B,) at RoPE positions (B,), written to cache slots (1,), attending
    with masks {window: bool (B, 1, 1, S)} -> the next-token logits (B, V) in float32."""
    h = model.decoder(model.decoder.embed(tokens[:, None]), positions[:, None], masks, cache, slots)  # (B, 1, D)
    return model.decoder.logits(h)[:, -1].float()
