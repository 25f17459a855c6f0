"""The `train` command: one option per TrainConfig field, a --config JSON file under them, then nanopali.train.fit.

Every value is checked by TrainConfig (one `nanopali: error:` line naming the option); an interrupted run exits
130 (SIGINT) or 143 (SIGTERM) after saving its checkpoint. The options are read from TrainConfig (nanopali.train.loop) only when `train` itself is parsed, so that
other commands and `nanopali --help` never import the training code.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from nanopali.errors import UsageError

TRAIN_MODEL_HELP = "checkpoint to start from, never a default: for the shipped model pass its directory (`nanopali info`)"
HELP = {
    "model": TRAIN_MODEL_HELP,
    "out": "run directory (checkpoints, metrics.jsonl, loss.png); one holding a run needs --resume or --overwrite",
    "resume": "continue the run in --out from its latest checkpoint (with the options it was started with)",
    "overwrite": "delete the run in --out (its checkpoints, latest, metrics.jsonl, loss.png) and start over",
    "max_grad_norm": "gradient clipping norm; 0: no clipping",
    "skip_bad": "skip and count bad JSONL lines (reported on stderr and in metrics.jsonl) instead of stopping",
    "objective": "suffix (PaliGemma: image/prefix/suffix lines, the default) | siglip | clip (a contrastive SigLIP "
                 "checkpoint: image/text lines)",
}


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="fine-tune on a JSONL of image/prefix/suffix examples (PaliGemma) or "
                                         "image/text pairs (SigLIP, --objective siglip|clip)", setup=_add_options)
    train.set_defaults(run=run_train)


def _add_options(train: argparse.ArgumentParser) -> None:
    from nanopali.train.loop import TrainConfig

    train.add_argument("--config", help="JSON file of training options; command-line options win")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(f.name))
        elif f.name == "lr_scale":
            train.add_argument(flag, type=_json_object, default=None, help='JSON, e.g. \'{"multi_modal_projector.*": 10}\'')
        elif str(f.type).startswith(("tuple", "list")):
            train.add_argument(flag, nargs="+", default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            train.add_argument(flag, type=kind, default=None, help=HELP.get(f.name))


def _json_object(text: str) -> dict:
    """--lr-scale's value: a JSON object (argparse reports anything else as one usage error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"multi_modal_projector.*": 10}}\', got {text!r}')
    return value


def run_train(args) -> int:
    """Train; print the final checkpoint. An interrupted run (SIGINT/SIGTERM) prints one `nanopali: error:` line
    naming the step and the saved checkpoint and exits as shells do for the signal (130 / 143)."""
    from nanopali.train import TrainConfig, TrainingInterrupted, fit

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if not args.config and "model" not in given:
        raise UsageError("train needs --model (the checkpoint to start from) or a --config file that names it")
    config = TrainConfig.from_file(args.config, **given) if args.config else TrainConfig(**given)
    try:
        final = fit(config)
    except TrainingInterrupted as e:
        print(f"nanopali: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"final checkpoint: {final}")
    return 0
