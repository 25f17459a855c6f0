"""The `nanopali` command (also `python -m nanopali`): every task from a terminal, through the pipeline.

    nanopali caption  IMAGE [--model DIR]               nanopali detect  IMAGE "cat ; dog" --out boxes.png
    nanopali answer   IMAGE "question"                  nanopali segment IMAGE "cat" --out mask.png
    nanopali ocr      IMAGE                             nanopali generate IMAGE "any prompt"
    nanopali chat     IMAGE                             nanopali info [DIR]
    nanopali classify IMAGE "cat, dog"                  nanopali search DIR_OF_IMAGES "a red car"
    nanopali convert  big_vision.npz OUT --config paligemma-3b-224 [--tokenizer paligemma_tokenizer.model]
    nanopali train    --model DIR --data train.jsonl --out runs/x [--config train.json]
    nanopali upcycle  DIR OUT --experts 8 --top-k 2     (a dense checkpoint -> mixture of experts)
    nanopali serve    [--model DIR] [--port 8000]   an OpenAI-compatible HTTP API and a web page

Without --model a command uses the shipped default model (paths.py): a small PaliGemma trained on
nanopali's toy shapes world, which knows only that world; $NANOPALI_DEFAULT_MODEL names another default.
train always needs --model: to fine-tune the shipped model, pass its directory (`nanopali info` prints it).

classify and search use a contrastive SigLIP model (the shipped default: a small SigLIP of the same world).

One module per command group: tasks.py (caption … chat), zero_shot.py (classify, search), info.py, convert.py,
train.py, upcycle.py, serve.py; common.py holds what they share. Each imports what it runs only when it runs
(`nanopali caption` never imports the training code).

A user mistake (missing image, bad model path, bad data: a nanopali.errors.NanopaliError) prints one
`nanopali: error: …` line and exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from nanopali.cli import convert, info, serve, tasks, train, upcycle, zero_shot
from nanopali.cli.common import LazyParser
from nanopali.errors import NanopaliError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanopali", description="PaliGemma, PaliGemma 2 and SigLIP in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=LazyParser)
    tasks.add_commands(sub)
    zero_shot.add_commands(sub)
    info.add_commands(sub)
    convert.add_commands(sub)
    train.add_commands(sub)
    upcycle.add_commands(sub)
    serve.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except NanopaliError as e:
        print(f"nanopali: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
