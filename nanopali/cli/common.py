"""What the command groups share: the task options, the dtype table, loading the pipeline, lazy subparsers.

Nothing heavy is imported at the top: `nanopali --help` builds every parser, and a command imports
what it runs only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from nanopali.paths import ENV_VAR

DTYPES = ("float32", "bfloat16", "float16")  # --dtype choices, names of torch dtypes
MODEL_HELP = ("checkpoint directory in Hugging Face layout, or a big_vision release .npz with --config; default: the shipped model, a small PaliGemma trained on "
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


def model_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that say which model to load and how (every task command and `serve`); `load(args)` reads them."""
    from nanopali.inference.quantize import MODES

    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--config", help="with --model X.npz (a big_vision release): the model's sizes, a published size "
                                         "(e.g. paligemma-3b-224) or a config.json")
    parser.add_argument("--tokenizer", help="with --model X.npz: big_vision's paligemma_tokenizer.model (default: beside the npz)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vae", help="mask VQ-VAE (vae-oid.npz) for segment; default: next to the model")
    parser.add_argument("--quantize", choices=list(MODES), help="quantize the decoder weights after loading (faster decoding; int4 is coarser)")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="the CPU kernels (measured one-row products, fused gelu/RMSNorm), CUDA-graph "
                             "decode step (GPU); --no-fast: none of them, plain PyTorch (for debugging)")
    parser.add_argument("--compile", action="store_true",
                        help="run the decode step through torch.compile (for a GPU: fused kernels in the CUDA graph; "
                             "the first answer waits for the compilation, seconds to a minute)")
    return parser


def task_options() -> argparse.ArgumentParser:
    """The options every task command takes (a parent parser)."""
    common = model_options(argparse.ArgumentParser(add_help=False))
    common.add_argument("--max-new-tokens", type=int, help="at least 1; default depends on the task")
    common.add_argument("--temperature", type=float, help="0 (the default) = greedy; > 0 samples")
    common.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]; needs --temperature > 0 (default 1: off)")
    common.add_argument("--top-k", type=int, help="sample among the k likeliest tokens; needs --temperature > 0 (default 0: off)")
    common.add_argument("--seed", type=int, help="random seed of sampling; needs --temperature > 0 (default 0)")
    common.add_argument("--num-beams", type=int, help="beam search with this many beams (default 1: none); not with --temperature > 0")
    common.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="print a JSON result")
    common.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print text as it comes")
    common.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False, help="latency and tokens/s")
    return common


FLAGS = {"do_sample": "--temperature > 0"}  # how the CLI names an option in a message (default: --max-new-tokens …)


def cli_spelling(name: str, value) -> str:
    """How an error message names an option given on the command line: "--top-p 2.0"."""
    flag = FLAGS.get(name) or "--" + name.replace("_", "-")
    return flag if isinstance(value, bool) else f"{flag} {value}"


def generation(args, device=None) -> dict:
    """Keyword arguments of the pipeline's generate/stream/detect/segment from the task options, every value
    checked (inference/options.py; a UsageError names the flag) and none replaced by a default: an option
    not given is the task's default (max-new-tokens) or the documented one. `device`: where the sampling
    generator lives (the model's device); without it none is made (checking the options before loading)."""
    import torch

    from nanopali.errors import UsageError
    from nanopali.inference.options import GenerationOptions
    from nanopali.pipeline import TASK_TOKENS

    temperature = 0.0 if args.temperature is None else args.temperature
    given = {name: value for name, value in (("top_p", args.top_p), ("top_k", args.top_k), ("seed", args.seed))
             if value is not None}
    task_default = TASK_TOKENS.get(args.command, TASK_TOKENS["generate"])  # chat: generate's
    options = GenerationOptions(
        max_new_tokens=task_default if args.max_new_tokens is None else args.max_new_tokens,
        temperature=temperature, top_p=1.0 if args.top_p is None else args.top_p,
        top_k=0 if args.top_k is None else args.top_k, num_beams=1 if args.num_beams is None else args.num_beams,
        do_sample=False, spell=cli_spelling)  # ranges first, each value named as its flag
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed {args.seed}: must be an integer in [0, 2**64)")
    sampling = temperature > 0
    if given and not sampling:
        named = ", ".join(cli_spelling(name, value) for name, value in given.items())
        raise UsageError(f"{named} needs --temperature > 0: without it decoding is greedy and would ignore "
                         f"{'it' if len(given) == 1 else 'them'}")
    if sampling and options.num_beams > 1:
        raise UsageError(f"--num-beams {options.num_beams} (beam search) cannot be combined with --temperature "
                         f"{temperature} (sampling); use one of them")
    if getattr(args, "command", None) == "chat" and options.num_beams > 1:
        raise UsageError(f"--num-beams {options.num_beams}: chat streams its answers, and beam search cannot stream")
    kw = options.kwargs()
    kw["num_beams"] = options.num_beams
    if sampling:
        kw.update(do_sample=True, temperature=temperature)
        if device is not None:
            kw["generator"] = torch.Generator(device=device).manual_seed(args.seed or 0)
    else:
        kw.pop("temperature", None)
    return kw


def load(args):
    """The pipeline (nanopali.load) the task options ask for."""
    import torch

    from nanopali.pipeline import load

    return load(args.model, dtype=getattr(torch, args.dtype), device=args.device, vae=args.vae,
                progress=sys.stderr.isatty(), quantize=args.quantize, fast=args.fast, config=args.config,
                tokenizer=args.tokenizer, compile=args.compile)
