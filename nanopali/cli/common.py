"""What the command groups share: the task options, the dtype table, loading the pipeline, lazy subparsers.

Nothing heavy is imported at the top: `nanopali --help` builds every parser, and a command imports
what it runs only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from nanopali.paths import ENV_VAR

DTYPES = ("float32", "bfloat16", "float16")  # --dtype choices, names of torch dtypes
MODEL_HELP = ("checkpoint directory in Hugging Face layout; default: the shipped model, a small PaliGemma trained on "
              f"nanopali's toy shapes world that knows only that world (${ENV_VAR} overrides the default)")


class LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments `setup(parser)` adds only when that subcommand is parsed,
    so that building the whole command line never imports what only one subcommand needs."""

    def __init__(self, *args, setup=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup = setup

    def parse_known_args(self, args=None, namespace=None):
        if self._setup is not None:
            setup, self._setup = self._setup, None
            setup(self)
        return super().parse_known_args(args, namespace)


def task_options() -> argparse.ArgumentParser:
    """The options every task command takes (a parent parser)."""
    from nanopali.inference.quantize import MODES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help=MODEL_HELP)
    common.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    common.add_argument("--device", default="cpu")
    common.add_argument("--max-new-tokens", type=int, help="default depends on the task")
    common.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    common.add_argument("--top-p", type=float, default=1.0)
    common.add_argument("--top-k", type=int, default=0)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--num-beams", type=int, default=1)
    common.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="print a JSON result")
    common.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print text as it comes")
    common.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False, help="latency and tokens/s")
    common.add_argument("--vae", help="mask VQ-VAE (vae-oid.npz) for segment; default: next to the model")
    common.add_argument("--quantize", choices=list(MODES), help="quantize the decoder weights after loading (faster decoding; int4 is coarser)")
    common.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="fast.py's CPU kernels (measured one-row products, fused gelu/RMSNorm), CUDA-graph "
                             "decode step (GPU); --no-fast: none of them, plain PyTorch (for debugging)")
    return common


def generation(args) -> dict:
    """Keyword arguments of the pipeline's generate/stream/detect/segment from the task options."""
    import torch

    kw = {"num_beams": args.num_beams}
    if args.max_new_tokens:
        kw["max_new_tokens"] = args.max_new_tokens
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  generator=torch.Generator().manual_seed(args.seed))
    return kw


def load(args):
    """The pipeline (nanopali.load) the task options ask for."""
    import torch

    from nanopali.pipeline import load

    return load(args.model, dtype=getattr(torch, args.dtype), device=args.device, vae=args.vae,
                progress=sys.stderr.isatty(), quantize=args.quantize, fast=args.fast)
