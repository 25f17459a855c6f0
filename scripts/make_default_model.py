"""Reproduce nanopali's shipped default model from seeds: tokenizer, mask VQ-VAE, data, training, model card.

    python scripts/make_default_model.py --work runs/default            # every stage, resumable
    python scripts/make_default_model.py --work runs/default --stage vae  # one stage

Stages (nanopali/world/recipe/stages.py; each writes under --work and is skipped when its output exists, so a
killed run continues):
    tokenizer   SentencePiece on the world's text (nanopali/world/tokenizer.py)
    vae         the vae-oid VQ-VAE trained on world object masks (nanopali/world/vqvae.py)
    data        the training scenes as arrays + examples (nanopali/world/recipe/data.py), VQA "how many" thinned;
                the "fresh" splits (later scenes of the same seed, for the last cycles) are made when first needed
    init        the PaliGemma config and from-scratch weights (loc-token embeddings start smooth in the value)
    warmup      the vision tower alone on per-patch shape/colour/word labels (nanopali/world/patch_warmup.py),
                background patches weighed down
    train       the whole model with nanopali's trainer (nanopali/train/loop.py fit), checkpointed, resumable;
                with --vision-from SIGLIP_DIR its vision tower starts from a contrastive SigLIP's (made by
                scripts/make_default_siglip.py --stage scratch) instead of the warm-up's (compared in
                miniature by scripts/compare_warm_start.py: behind the warm-up, BENCHMARKS.md)
    more        further, lower cosine cycles of the trainer (nanopali/world/recipe/cycles.py), each from the last
                one's weights (WORK/run2, ...); the reading cycles with the per-patch labels as an auxiliary loss;
                `--start DIR` continues after a checkpoint copied from another machine
    ship        the newest checkpoint in bf16 + tokenizer + VQ-VAE into nanopali/world/default_model/, scored on
                1000 held-out scenes (nanopali/world/eval.py, seed 3; every answer in WORK/eval-records.json),
                examples/world-*.png (seed 5), the card
    card        the model card README.md from WORK/metrics.json and WORK/limitations.md (no evaluation)

Wall time per stage accumulates in WORK/times.json (a resumed stage adds to its entry).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nanopali.world.recipe.stages import STAGES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/default"))
    p.add_argument("--stage", choices=list(STAGES), action="append", help="run only these stages (default: all)")
    p.add_argument("--start", type=Path, help="more: continue after this checkpoint (in a run directory named like "
                                              "WORK's, e.g. run5/checkpoint-002500) instead of WORK's own cycles")
    p.add_argument("--vision-from", type=Path, help="train/more: start the vision tower from this SigLIP checkpoint "
                                                     "instead of the per-patch warm-up")
    args = p.parse_args(argv)
    if args.start and args.stage != ["more"]:
        p.error("--start continues the more stage alone: add --stage more (and no other stage)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    times_file = args.work / "times.json"
    for name in args.stage or [s for s in STAGES if s != "card"]:  # ship writes the card
        start = time.perf_counter()
        options = {"start": args.start} if name == "more" else {}
        if name in ("train", "more"):
            options["vision_from"] = args.vision_from
        STAGES[name](args.work, **options)
        times = json.loads(times_file.read_text()) if times_file.is_file() else {}
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        times_file.write_text(json.dumps(times))


if __name__ == "__main__":
    main()
