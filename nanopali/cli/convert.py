"""The `convert` command: a big_vision release .npz -> a Hugging Face checkpoint directory.

    nanopali convert paligemma-3b-pt-224.npz OUT --config paligemma-3b-224 [--tokenizer paligemma_tokenizer.model]

OUT gets sharded safetensors and config.json (and, with a tokenizer, the tokenizer files and
preprocessor_config.json), which transformers' PaliGemmaForConditionalGeneration and every nanopali command
load. The npz, the config, the tokenizer and OUT are all checked before the weights are read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nanopali.cli.common import DTYPES


def add_commands(sub) -> None:
    convert = sub.add_parser("convert", help="write a big_vision .npz as a Hugging Face checkpoint directory")
    convert.add_argument("npz", help="big_vision checkpoint, e.g. paligemma-3b-pt-224.npz or paligemma2-3b-pt-448.b16.npz")
    convert.add_argument("out", help="the directory to write (new or empty)")
    convert.add_argument("--config", required=True,
                         help="the model's sizes: a published size (e.g. paligemma-3b-224, paligemma2-10b-448) or a config.json")
    convert.add_argument("--tokenizer", help="big_vision's paligemma_tokenizer.model (default: that file beside the npz, "
                                             "if there is one); without it OUT has no tokenizer and only loads as weights")
    convert.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the written weights")
    convert.add_argument("--max-shard-size", default="5GB")
    convert.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                         help="write into an OUT that already holds files (its checkpoint files are replaced)")
    convert.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from nanopali.errors import MissingFileError, UsageError
    from nanopali.inputs.processor import Processor
    from nanopali.io import big_vision
    from nanopali.io.hf_checkpoint import parse_size
    from nanopali.models.paligemma import PaliGemma
    from nanopali.pipeline import release_tokenizer
    from nanopali.registry import resolve_config

    if not big_vision.is_npz(args.npz):
        raise UsageError(f"{args.npz}: convert reads a big_vision .npz checkpoint")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; OUT is the directory to write the checkpoint to")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} is not empty; pass --overwrite to write the checkpoint into it anyway")
    try:
        parse_size(args.max_shard_size)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None
    big_vision.check_file(args.npz)
    config = resolve_config(args.config)
    try:
        tokenizer = release_tokenizer(args.npz, args.tokenizer)
    except MissingFileError:
        tokenizer = None  # weights only: a directory transformers and PaliGemma.from_pretrained load
    processor = Processor.from_config(config, tokenizer) if tokenizer is not None else None
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise UsageError(f"{out} is not writable")
    model = PaliGemma.from_big_vision(args.npz, config, dtype=args.dtype, progress=sys.stderr.isatty())
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    if processor is not None:
        processor.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {count:,} parameters in {args.dtype}, {size / 1e9:.2f} GB of safetensors"
          + (f", tokenizer {tokenizer}" if processor is not None else
             "; no tokenizer (pass --tokenizer paligemma_tokenizer.model for the task commands)"))
    return 0
