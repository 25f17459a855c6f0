"""Write a seeded toy-world training set (nanopali/world/): PNG images and train.jsonl in the training format.

    python scripts/make_world_data.py --out data/world --n 1000 --seed 0 [--size 224] [--vae vae-oid.npz]

Image i of seed s is drawn from nanopali.world.scenes.scene_rng(s, i), so a held-out set is the same command
with another seed. Each line of OUT/train.jsonl is {"image": "images/000012.png", "prefix": ..., "suffix": ...}
(paths relative to the JSONL, as nanopali.train.JsonlDataset reads them); every example of every scene is
written. segment examples need --vae. The counts per task (train/metrics.task_of) are printed at the end.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from nanopali.train.metrics import task_of
from nanopali.world.examples import examples
from nanopali.world.scenes import make_scene, scene_rng


def write(out: Path, n: int, seed: int, size: int = 224, vae=None) -> Counter:
    """Write n scenes and their examples under out; returns the number of examples per task."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    with open(out / "train.jsonl", "w", encoding="utf-8") as jsonl:
        for i in range(n):
            rng = scene_rng(seed, i)
            scene = make_scene(rng, size=size)
            name = f"images/{i:06d}.png"
            scene.image.save(out / name)
            for ex in examples(scene, rng, vae):
                jsonl.write(json.dumps({"image": name, **ex}) + "\n")
                counts[task_of(ex["prefix"])] += 1
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for images/ and train.jsonl")
    p.add_argument("--n", type=int, default=1000, help="number of scenes (images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--vae", type=Path, help="mask VQ-VAE .npz (vae-oid.npz); without it, no segment examples")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if args.size < 64:
        p.error(f"--size must be at least 64 pixels, got {args.size}")
    vae = None
    if args.vae is not None:
        if not args.vae.is_file():
            p.error(f"--vae {args.vae} does not exist")
        from nanopali.tasks import SegmentationVAE
        vae = SegmentationVAE.from_npz(args.vae)
    counts = write(args.out, args.n, args.seed, args.size, vae)
    for task, count in sorted(counts.items()):
        print(f"{task:20s} {count}")
    print(f"{'total':20s} {sum(counts.values())} examples of {args.n} images in {args.out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
