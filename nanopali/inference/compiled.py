"""The decode step through torch.compile (gpt-fast's compiled step), an opt-in for the GPU.

On a GPU even a CUDA graph of the eager step (cuda_graph.py) replays one kernel per op: ~25 per layer for the
norms, RoPE, GeGLU, casts and the cache write, each a separate pass over tiny tensors, and one-row products
through cuBLAS. Inductor fuses the elementwise ops into a few kernels and, with coordinate-descent tuning (the
setting gpt-fast runs with), turns each one-row product into one multiply-and-reduce kernel, which for an int8
weight also dequantizes it as it reads it, instead of writing a bf16 copy of the weight first. The compiled
step is then captured in a CUDA graph as the eager one is.

Compiling takes seconds to a minute, once per runtime and shape family: the first new cache length or batch
size makes torch.compile recompile with that dimension dynamic, later ones reuse it. On the CPU the native
kernels (cpu_kernels.py) are the fast path, so compiling there is only for the plain modules (how the tests
check it against the eager step). A step that fails to compile warns once and runs eagerly from then on.
"""

from __future__ import annotations

import warnings

import torch

# Inductor options: the one-row product as a fused multiply + reduction (its mm decomposition for a GPU only
# happens with coordinate-descent tuning, which also tunes the reductions' block sizes).
OPTIONS = {"coordinate_descent_tuning": True}


class CompiledStep:
    """`fn` (the decode step) compiled with fullgraph=True; `fn` itself once compiling or running it has failed."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, fullgraph=True, options=OPTIONS)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # no compiler, an op Inductor cannot lower, ...: the step is idempotent, rerun it
                self.failed = True
                warnings.warn(f"nanopali.inference.compiled: compiling the decode step failed ({type(e).__name__}: "
                              f"{e}); decoding eagerly from now on", RuntimeWarning, stacklevel=2)
        return self.fn(*args)
