"""Warm-starting the default PaliGemma from a SigLIP, in miniature: the default recipe's first cycle cut to --steps
steps (its schedule scaled), once from the per-patch warm-up's vision tower (what the default model does) and once
from a SigLIP's (make_default_model.py --vision-from), both scored on --n held-out scenes of seed 3.

    python scripts/make_default_siglip.py --work runs/siglip --stage scratch     # the SigLIP trained from scratch
    python scripts/compare_warm_start.py --siglip runs/siglip/run --work runs/default --steps 1000 --n 200

The recipe's stages (tokenizer, VQ-VAE, data, init, per-patch warm-up) are made in --work when missing, as
make_default_model.py makes them; the scores go to WORK/warm-start.json (BENCHMARKS.md has the table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nanopali
from nanopali.train import TrainConfig, checkpoint, fit
from nanopali.world.eval import evaluate_world
from nanopali.world.recipe import stages
from nanopali.world.recipe.cycles import TRAIN
from nanopali.world.recipe.data import WorldExamples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--siglip", type=Path, required=True, help="a SigLIP run directory (its newest checkpoint) or checkpoint")
    p.add_argument("--work", type=Path, default=Path("runs/default"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--n", type=int, default=200, help="held-out scenes scored")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    siglip = checkpoint.latest(args.siglip) or args.siglip
    out = {"steps": args.steps, "n": args.n, "siglip_checkpoint": str(siglip), "seconds": {}}
    for name in ("tokenizer", "vae", "data", "init", "warmup"):
        start = time.perf_counter()
        getattr(stages, f"stage_{name}")(args.work)
        out["seconds"][name] = time.perf_counter() - start
    for arm, model in (("patch", stages.stage_warmup(args.work)), ("siglip", stages.stage_siglip_init(args.work, siglip))):
        start = time.perf_counter()
        config = TrainConfig(model=str(model), out=str(args.work / f"warm-start-{arm}"), resume=True,
                             **dict(TRAIN, steps=args.steps, warmup_steps=args.steps * TRAIN["warmup_steps"] // TRAIN["steps"],
                                    save_every=max(1, args.steps // 4)))
        final = fit(config, train_data=WorldExamples(stages.stage_data(args.work)))
        out["seconds"][f"train {arm}"] = time.perf_counter() - start
        out[arm] = evaluate_world(nanopali.load(str(final)), n_scenes=args.n, seed=3)
        (args.work / "warm-start.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
