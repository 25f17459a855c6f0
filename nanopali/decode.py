"""Cached decoding mechanics: prefill the prefix into a static KV cache, then one token per row per step.

    prefill(model, input_ids, pixel_values, attention_mask, token_type_ids)  -> logits (B, V), DecodeState
    state.step(model, tokens)                                                -> logits (B, V)

The prefix (image + <bos> + prompt + "\\n") is run once with bidirectional prefix attention; every
generated token is a causal suffix token. All masks come from masks.prefix_lm_mask over the cache
slots, so the decode step has static shapes (B, 1, 1, S) and is the only part worth compiling.
Padding may be on either side: the first new token is predicted from each row's last real token and
positions count real tokens only. Strategies (greedy, sampling, beams) live in generate.py / beam.py.

On CUDA the step is a CUDA graph (gpt-fast's idea, by hand; `model.cuda_graphs = False` turns it off):
a batch-1 step of the 3B decoder launches several hundred small kernels, whose launch overhead, paid
eagerly per token, can exceed the time a GPU takes to read the weights. The static cache gives every
step of one DecodeState the same shapes and the same cache tensors, so the first step captures
`decode_step` into a torch.cuda.CUDAGraph and every step replays it after copying its inputs (tokens,
positions, cache slot, masks; the masks are built outside the graph) into the graph's static buffers.
Beam search replaces the cache tensors when it reorders rows, so it stays eager.
On CPU the model's fast.StepChooser times the first steps under each of fast.py's one-row product paths
and keeps the faster (which one wins depends on the processor).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .masks import positions_of, prefix_lm_inputs, prefix_lm_mask


@dataclass
class DecodeState:
    """Everything the decode step needs besides the model: the cache and what each slot holds."""

    cache: KVCache
    kv_valid: torch.Tensor   # bool (B, S): slot holds a real token
    kv_prefix: torch.Tensor  # bool (B, S): slot holds a prefix token
    kv_pos: torch.Tensor     # long (B, S): RoPE position of each slot's token
    positions: torch.Tensor  # long (B,): RoPE position of the next token
    slot: int                # next free slot (shared by all rows)
    cuda_graph: bool = False             # replay the step as a CUDA graph (prefill sets it on CUDA)
    graph: GraphedStep | None = None     # captured at the first step

    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B,) as suffix tokens; return the next-token logits (B, V) in float32."""
        if self.slot >= self.cache.max_len:
            raise RuntimeError(f"KV cache full ({self.cache.max_len} slots)")
        slots = torch.full((1,), self.slot, dtype=torch.long, device=self.kv_valid.device)  # no host-device sync
        self.kv_valid[:, self.slot] = True
        self.kv_pos[:, self.slot] = self.positions
        masks = {w: prefix_lm_mask(self.kv_valid, self.kv_prefix, self.kv_pos, slots, w) for w in model.decoder.windows}
        inputs = (tokens, self.positions, masks, slots)
        graphed = self.cuda_graph and not torch.is_grad_enabled()  # a graph replays no autograd history
        if graphed and self.graph is None:
            self.graph = capture(model, self.cache, *inputs)
            self.cuda_graph = self.graph is not None
        if graphed and self.graph is not None:
            logits = self.graph(*inputs)
        elif self.kv_valid.device.type == "cpu" and hasattr(model, "step_chooser"):  # fast.py's one-row path, timed
            logits = model.step_chooser.run(lambda: decode_step(model, self.cache, *inputs))
        else:
            logits = decode_step(model, self.cache, *inputs)
        self.positions = self.positions + 1
        self.slot += 1
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        self.cuda_graph, self.graph = False, None  # new cache tensors: a graph would write to the old ones
        self.cache.reorder(rows)
        self.kv_valid, self.kv_prefix = self.kv_valid[rows], self.kv_prefix[rows]
        self.kv_pos, self.positions = self.kv_pos[rows], self.positions[rows]


def prefill(model, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None, max_new_tokens: int = 0,
            rows_per_input: int = 1) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompt through the model, filling a cache with room for max_new_tokens more.

    rows_per_input > 1 repeats every row (beam search) after the prefill. Returns the logits of the
    token after each row's last real token (B * rows_per_input, V) and the decode state.
    """
    attention_mask, token_type_ids = prefix_lm_inputs(input_ids, attention_mask, token_type_ids)
    B, T = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    if not valid.any(-1).all():
        raise ValueError("a row of attention_mask is all zeros: nothing to generate from")
    S = T + max_new_tokens
    limit = model.config.text_config.max_position_embeddings
    if S > limit:
        raise ValueError(f"the prompt is {T} tokens and {max_new_tokens} new tokens were asked for: {S} positions, "
                         f"but this model takes at most {limit}")
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
    state = DecodeState(cache, kv_valid, kv_prefix, kv_pos, valid.sum(-1) + 1, T,
                        cuda_graph=device.type == "cuda" and getattr(model, "cuda_graphs", False))
    if rows_per_input > 1:
        rows = torch.arange(B, device=device).repeat_interleave(rows_per_input)
        state.reorder(rows)
        logits = logits[rows]
    return logits, state


def decode_step(model, cache: KVCache, tokens, positions, masks, slots) -> torch.Tensor:
    """One cached forward: tokens (B,) at RoPE positions (B,), written to cache slots (1,), attending
    with masks {window: bool (B, 1, 1, S)} -> the next-token logits (B, V) in float32."""
    h = model.decoder(model.decoder.embed(tokens[:, None]), positions[:, None], masks, cache, slots)  # (B, 1, D)
    return model.decoder.logits(h)[:, -1].float()


class GraphedStep:
    """decode_step captured in a CUDA graph; called with new inputs, it copies them into its static
    buffers, replays the graph and returns a copy of its static logits (the next replay overwrites them).

    The graph bakes in the addresses of the weights, the cache tensors and its buffers. Capturing
    follows PyTorch's recipe: a warm-up run on a side stream, then one captured run. The warm-up runs
    the step for real, which is harmless: it writes the same k, v to the same slot that the replay
    writes again.
    """

    def __init__(self, model, cache: KVCache, tokens, positions, masks, slots):
        self.tokens, self.positions, self.slots = tokens.clone(), positions.clone(), slots.clone()
        self.masks = {w: m.clone() for w, m in masks.items()}
        run = lambda: decode_step(model, cache, self.tokens, self.positions, self.masks, self.slots)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()                                                # (B, V), in the graph's memory

    def __call__(self, tokens, positions, masks, slots) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.slots.copy_(slots)
        for w, m in masks.items():
            self.masks[w].copy_(m)
        self.graph.replay()
        return self.logits.clone()


_capture_failed = False  # set when a capture failed once: decoding stays eager from then on


def capture(model, cache: KVCache, *inputs) -> GraphedStep | None:
    """GraphedStep(model, cache, *inputs), or None (with a warning, once) if the step cannot be captured."""
    global _capture_failed
    if _capture_failed:
        return None
    stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
    try:
        return GraphedStep(model, cache, *inputs)
    except Exception as e:  # an op that synchronises with the host, an old driver, ...
        if stream is not None:
            torch.cuda.set_stream(stream)  # a capture that fails in torch.cuda.graph leaves its stream current
        _capture_failed = True
        warnings.warn(f"nanopali.decode: capturing the decode step in a CUDA graph failed ({type(e).__name__}: {e}); "
                      "decoding eagerly from now on", RuntimeWarning, stacklevel=3)
        return None


@dataclass
class GenerateOutput:
    tokens: torch.Tensor    # long (B, N): new tokens, pad id after <eos>
    logprobs: torch.Tensor  # float (B, N): log-probability of each token under the model (0 on padding)
