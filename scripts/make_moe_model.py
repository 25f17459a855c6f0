"""Train mixture-of-experts PaliGemmas on the shapes world and compare them with the dense model (issue #22).

    python scripts/make_moe_model.py --work runs/moe                                 # everything, resumable
    python scripts/make_moe_model.py --work runs/moe --stage train --run upcycle-moe  # one run
    python scripts/make_moe_model.py --work runs/moe --stage ship --pair upcycle       # -> nanopali/world/moe_model

Stages (nanopali/world/recipe/moe.py, which says what each comparison matches):
    data    scenes 150000-169999 of the training seed, which no cycle of the default model saw
    init    the four starting checkpoints: scratch dense / MoE from one seed, the shipped model / upcycled
    train   a run (--run: scratch-dense, scratch-moe, upcycle-dense, upcycle-moe; default all four)
    score   its world metrics on 1000 scenes of seed 17 (WORK/scores.json)
    report  the comparison table and the paired sign tests (WORK/comparison.md)
    ship    the MoE run of --pair into nanopali/world/moe_model
Wall time per stage and run accumulates in WORK/times.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nanopali.world.recipe.moe import RUNS, stage_data, stage_init, stage_report, stage_score, stage_ship, stage_train


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/moe"))
    p.add_argument("--stage", choices=("data", "init", "train", "score", "report", "ship"), action="append")
    p.add_argument("--run", choices=list(RUNS), action="append", help="train / score these runs (default: all)")
    p.add_argument("--pair", choices=("scratch", "upcycle"), help="ship: the comparison whose MoE to ship")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = args.stage or ["data", "init", "train", "score", "report"]
    if "ship" in stages and not args.pair:
        p.error("--stage ship needs --pair (the comparison whose MoE run is shipped)")
    times_file = args.work / "times.json"
    for stage in stages:
        for run in (args.run or list(RUNS)) if stage in ("train", "score") else [None]:
            start = time.perf_counter()
            if stage == "ship":
                stage_ship(args.work, args.pair)
            elif stage == "report":
                print(stage_report(args.work))
            elif run is None:
                {"data": stage_data, "init": stage_init}[stage](args.work)
            else:
                result = (stage_train if stage == "train" else stage_score)(args.work, run)
                print(f"{stage} {run}: {result}")
            times = json.loads(times_file.read_text()) if times_file.is_file() else {}
            key = stage if run is None else f"{stage} {run}"
            times[key] = times.get(key, 0.0) + time.perf_counter() - start
            times_file.write_text(json.dumps(times))


if __name__ == "__main__":
    main()
