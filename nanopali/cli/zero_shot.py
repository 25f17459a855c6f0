"""The contrastive commands, through the zero-shot pipeline (nanopali/zero_shot.py):

    nanopali classify IMAGE "cat, dog, a red car" [--template "a photo of {}."] [--model DIR] [--json]
    nanopali search   DIR_OF_IMAGES "a red car" [--top-k 10] [--model DIR] [--json] [--no-cache]

Without --model they use the shipped contrastive default, a small SigLIP of nanopali's toy shapes world
($NANOPALI_DEFAULT_SIGLIP names another). A label or query over the text tower's length is cut, with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from nanopali.cli.common import DTYPES
from nanopali.paths import SIGLIP_ENV_VAR

MODEL_HELP = ("SigLIP checkpoint directory in Hugging Face layout; default: the shipped one, a small SigLIP trained "
              f"on nanopali's toy shapes world that knows only that world (${SIGLIP_ENV_VAR} overrides the default)")


def add_commands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help=MODEL_HELP)
    common.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_argument("--device", default="cpu")
    common.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="print a JSON result")
    c = sub.add_parser("classify", parents=[common], help="zero-shot: how well each label fits an image (SigLIP)")
    c.add_argument("image")
    c.add_argument("labels", help='comma-separated: "cat, dog, a red car"')
    c.add_argument("--template", default="{}", help='the text for each label, {} = the label (default "{}"; e.g. '
                                                    '"a photo of {}.")')
    c.set_defaults(run=run_classify)
    s = sub.add_parser("search", parents=[common], help="rank a folder's images by a text query (SigLIP)")
    s.add_argument("folder")
    s.add_argument("query")
    s.add_argument("--top-k", type=int, default=10, help="how many images to list (default 10)")
    s.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the image embeddings in nanopali-embeddings.npy in the folder (default on)")
    s.set_defaults(run=run_search)


def _load(args):
    import torch

    from nanopali.zero_shot import load_contrastive

    return load_contrastive(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                            progress=sys.stderr.isatty())


def _notes(caught) -> None:
    for w in caught:
        print(f"nanopali: note: {w.message}", file=sys.stderr)


def run_classify(args) -> int:
    from nanopali.inputs.images import load_image
    from nanopali.inputs.siglip_processor import TextTruncatedWarning
    from nanopali.inputs.tokenizer import check_text
    from nanopali.zero_shot import parse_labels

    check_text(args.labels, "the labels")
    labels = parse_labels(args.labels)  # checked before the model is loaded
    image = load_image(args.image)
    clip = _load(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TextTruncatedWarning)
        ranked = clip.classify(image, labels, template=args.template)
    _notes(caught)
    kind = "sigmoid" if clip.model.config.objective == "siglip" else "softmax"
    if args.json:
        print(json.dumps({"image": args.image, "probability": kind, "labels": [{"label": x, "probability": p}
                                                                              for x, p in ranked]}))
    else:
        width = max(len(x) for x, _ in ranked)
        for label, p in ranked:
            print(f"{p:7.2%}  {label:<{width}}")
    return 0


def run_search(args) -> int:
    from nanopali.errors import UsageError
    from nanopali.inputs.siglip_processor import TextTruncatedWarning
    from nanopali.inputs.tokenizer import check_text
    from nanopali.zero_shot import image_files

    check_text(args.query, "the query")
    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: must be at least 1")
    image_files(args.folder)  # a folder with images, checked before the model is loaded
    clip = _load(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TextTruncatedWarning)
        hits = clip.search(args.folder, args.query, top_k=args.top_k, cache=args.cache)
    _notes(caught)
    if args.json:
        print(json.dumps({"query": args.query, "results": [{"image": str(p), "probability": prob, "cosine": cos}
                                                           for p, prob, cos in hits]}))
    else:
        for path, prob, cos in hits:
            print(f"{prob:7.2%}  cos {cos:+.3f}  {path}")
    return 0
