"""The `train` command: one option per TrainConfig field, a --config JSON file under them, then nanopali.train.fit.

The options are read from TrainConfig (nanopali.train.loop) only when `train` itself is parsed, so that
other commands and `nanopali --help` never import the training code.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from nanopali.errors import UsageError

TRAIN_MODEL_HELP = "checkpoint to start from, never a default: for the shipped model pass its directory (`nanopali info`)"


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="fine-tune on a JSONL of image/prefix/suffix examples", setup=_add_options)
    train.set_defaults(run=run_train)


def _add_options(train: argparse.ArgumentParser) -> None:
    from nanopali.train.loop import TrainConfig

    train.add_argument("--config", help="JSON file of training options; command-line options win")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "lr_scale":
            train.add_argument(flag, type=json.loads, default=None, help='JSON, e.g. \'{"multi_modal_projector.*": 10}\'')
        elif str(f.type).startswith(("tuple", "list")):
            train.add_argument(flag, nargs="+", default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            train.add_argument(flag, type=kind, default=None, help=TRAIN_MODEL_HELP if f.name == "model" else None)


def run_train(args) -> int:
    from nanopali.train import TrainConfig, fit

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if not args.config and "model" not in given:
        raise UsageError("train needs --model (the checkpoint to start from) or a --config file that names it")
    config = TrainConfig.from_file(args.config, **given) if args.config else TrainConfig(**given)
    final = fit(config)
    print(f"final checkpoint: {final}")
    return 0
