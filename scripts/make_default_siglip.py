"""Reproduce nanopali's shipped contrastive model: a small SigLIP trained from scratch on the toy world's pairs.

    python scripts/make_default_siglip.py --work runs/siglip              # every stage, resumable
    python scripts/make_default_siglip.py --work runs/siglip --stage ship  # one stage

Stages (nanopali/world/recipe/siglip.py; each writes under --work and is skipped or resumed when its output exists):
    data     30000 scenes of the training seed, each with its caption, its count and one object's label
    init     the SigLIP config (the default PaliGemma's vision tower + attention pooling, a 4-layer text tower over
             the world's tokenizer) with the paper's initial temperature and bias
    train    the shipped model: LiT on the default PaliGemma's vision tower (WORK/lit)
    ship     the newest LiT checkpoint in bf16 into nanopali/world/default_siglip/, scored on seeds 3 and 11
             (world/siglip.py; WORK/metrics.json), with its model card
    scratch  (only when named) the same SigLIP trained from scratch (WORK/run), for make_default_model.py --vision-from
    compare  (only when named) sigmoid vs softmax in miniature: LiT with a 2-layer text tower, both objectives at
             batch 32, 128 and 512 on the same pairs in two orders, and the sigmoid loss at 32 and 128 from
             b = -log(B - 1), scored on seed 3 (WORK/compare.json; the table in BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nanopali.world.recipe.siglip import STAGES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/siglip"))
    p.add_argument("--stage", choices=list(STAGES), action="append", help="run only these stages (default: all)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    times_file = args.work / "times.json"
    for name in args.stage or [s for s in STAGES if s not in ("scratch", "compare")]:
        start = time.perf_counter()
        STAGES[name](args.work)
        times = json.loads(times_file.read_text()) if times_file.is_file() else {}
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        times_file.write_text(json.dumps(times))


if __name__ == "__main__":
    main()
