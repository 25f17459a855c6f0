"""The `nanopali` command: caption an image or answer a question about it, streaming the answer.

    nanopali caption --model CHECKPOINT_DIR photo.jpg
    nanopali answer  --model CHECKPOINT_DIR photo.jpg "what is in the sky?"
    nanopali generate --model CHECKPOINT_DIR photo.jpg "detect cat"     # any PaliGemma prompt

CHECKPOINT_DIR is a Hugging Face layout PaliGemma checkpoint (config.json, safetensors, tokenizer).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .config import ConfigError
from .model import PaliGemma
from .processor import Processor
from .streaming import stream
from .weights import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanopali", description="PaliGemma in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="checkpoint directory in Hugging Face layout")
    common.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    common.add_argument("--max-new-tokens", type=int, default=64)
    common.add_argument("--sample", action=argparse.BooleanOptionalAction, default=False, help="sample instead of greedy")
    common.add_argument("--temperature", type=float, default=1.0)
    common.add_argument("--top-p", type=float, default=1.0)
    common.add_argument("--top-k", type=int, default=0)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--beams", type=int, default=1, help="beam search width (no streaming)")
    common.add_argument("--timing", action=argparse.BooleanOptionalAction, default=False, help="print load and generation time")
    c = sub.add_parser("caption", parents=[common], help="describe an image")
    c.add_argument("image")
    c.add_argument("--lang", default="en")
    a = sub.add_parser("answer", parents=[common], help="answer a question about an image")
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("--lang", default="en")
    g = sub.add_parser("generate", parents=[common], help="run any PaliGemma prompt")
    g.add_argument("image")
    g.add_argument("prompt")
    return p


def _prompt(args) -> str:
    if args.command == "caption":
        return f"caption {args.lang}"
    if args.command == "answer":
        return f"answer {args.lang} {args.question}"
    return args.prompt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        start = time.time()
        processor = Processor.from_pretrained(args.model)
        model = PaliGemma.from_pretrained(args.model, dtype=DTYPES[args.dtype])
        loaded = time.time()
        kwargs = dict(max_new_tokens=args.max_new_tokens)
        if args.sample:
            kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          generator=torch.Generator().manual_seed(args.seed))
        if args.beams > 1:
            batch = processor(images=[args.image], prompts=[_prompt(args)])
            ids = model.generate(**batch, num_beams=args.beams, **kwargs)
            print(processor.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True))
        else:
            for piece in stream(model, processor, args.image, _prompt(args), **kwargs):
                print(piece, end="", flush=True)
            print()
        if args.timing:
            print(f"[load {loaded - start:.1f} s, generate {time.time() - loaded:.1f} s]", file=sys.stderr)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"nanopali: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
