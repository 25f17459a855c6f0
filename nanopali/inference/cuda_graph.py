"""The decode step as a CUDA graph: captured once per generation, replayed for every token (gpt-fast's idea).

A batch-1 step of the 3B decoder launches several hundred small kernels, whose launch overhead, paid
eagerly per token, can exceed the time a GPU takes to read the weights. The static KV cache gives every
step of one decode the same shapes and tensors, so the first step is captured into a torch.cuda.CUDAGraph
and later steps copy their inputs (tokens, positions, cache slot, masks) into its static buffers and
replay it. Beam search replaces the cache tensors when it reorders rows, so it stays eager.
"""

from __future__ import annotations

import warnings

import torch


class GraphedStep:
    """A decode step `step(tokens, positions, masks, slots) -> logits` captured in a CUDA graph. Called with new
    inputs, it copies them into its static buffers, replays the graph and returns a copy of its static
    logits (the next replay overwrites them).

    The graph bakes in the addresses of the weights, the cache tensors and its buffers. Capturing
    follows PyTorch's recipe: a warm-up run on a side stream, then one captured run. The warm-up runs
    the step for real, which is harmless: it writes the same k, v to the same slot that the replay
    writes again.
    """

    def __init__(self, step, tokens, positions, masks, slots):
        self.tokens, self.positions, self.slots = tokens.clone(), positions.clone(), slots.clone()
        self.masks = {w: m.clone() for w, m in masks.items()}
        run = lambda: step(self.tokens, self.positions, self.masks, self.slots)  # noqa: E731
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


def capture(runtime, step, *inputs) -> GraphedStep | None:
    """GraphedStep(step, *inputs), or None (with a warning, once per runtime) if the step cannot be captured;
    `runtime.cuda_graph_failed` then keeps later decodes eager."""
    if runtime.cuda_graph_failed:
        return None
    stream = torch.cuda.current_stream() if torch.cuda.is_available() else None
    try:
        return GraphedStep(step, *inputs)
    except Exception as e:  # an op that synchronises with the host, an old driver, ...
        if stream is not None:
            torch.cuda.set_stream(stream)  # a capture that fails in torch.cuda.graph leaves its stream current
        runtime.cuda_graph_failed = True
        warnings.warn(f"nanopali.inference.cuda_graph: capturing the decode step in a CUDA graph failed "
                      f"({type(e).__name__}: {e}); decoding eagerly from now on", RuntimeWarning, stacklevel=3)
        return None
