"""The decode step through torch.compile (gpt-fast's compiled step), an opt-in for the GPU.

On a GPU even a CUDA graph of the eager step (cuda_graph.py) replays one kernel per op: ~25 per layer for the
norms, RoPE, GeGLU, casts and the cache write, each a separate pass over tiny tensors, and one-row products
through cuBLAS. Inductor fuses the elementwise ops into a few kernels and, with coordinate-descent tuning (the
setting gpt-fast runs with), turns each product of a single row (batch 1) into one multiply-and-reduce kernel,
which for an int8 weight also dequantizes it as it reads it, instead of writing a bf16 copy of the weight first
(at batch > 1 the products stay cuBLAS's, on that copy). The compiled step is then captured in a CUDA graph as
the eager one is.

Compiling takes seconds to a minute, once per runtime's model shape, dtype and batch kind (1, or more): the cache
length is marked dynamic from the first call, so another prompt or output length reuses the compilation. On the
CPU the native kernels (cpu_kernels.py) are the fast path, so compiling there is only for the plain modules (how
the tests check it against the eager step). A step that fails to compile warns once and runs eagerly from then on.
"""

from __future__ import annotations

import warnings

import torch

# Inductor options: the one-row product as a fused multiply + reduction (its mm decomposition for a GPU only
# happens with coordinate-descent tuning, which also tunes the reductions' block sizes).
OPTIONS = {"coordinate_descent_tuning": True}
# Compilations torch.compile keeps per function before it refuses another (its default is 8, shared by every model,
# dtype and batch kind a process decodes with this step, and fullgraph makes a refusal an error).
RECOMPILE_LIMIT = 64
LIMIT_SETTING = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # older


class CompiledStep:
    """The decode step `fn(model, cache, tokens, positions, masks, slots)` compiled with fullgraph=True; `fn`
    itself once compiling it has failed."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, fullgraph=True, options=OPTIONS)
        self.failed = False

    def __call__(self, model, cache, tokens, positions, masks, slots):
        args = (model, cache, tokens, positions, masks, slots)
        if self.failed:
            return self.fn(*args)
        for t in (*cache.k, *cache.v):                       # (B, KV, S, D): any cache length, one compilation
            torch._dynamo.maybe_mark_dynamic(t, 2)
        for m in masks.values():                             # (B, 1, 1, S)
            torch._dynamo.maybe_mark_dynamic(m, 3)
        try:
            with torch._dynamo.config.patch(LIMIT_SETTING, RECOMPILE_LIMIT):
                return self.compiled(*args)
        except torch.OutOfMemoryError:
            raise                                            # not the compiler's: eager would run out too
        except Exception as e:  # no compiler, an op Inductor cannot lower, ...: the step is idempotent, rerun it
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise                                        # a failed CUDA graph capture: cuda_graph.capture's to handle
            self.failed = True
            warnings.warn(f"nanopali.inference.compiled: compiling the decode step failed ({type(e).__name__}: "
                          f"{e}); decoding eagerly from now on", RuntimeWarning, stacklevel=2)
        return self.fn(*args)
