"""The default model's data: world scenes as arrays with their examples, and the trainer's dataset over them.

    write_split(work / "data-train.npz", seed=2, first=0, n=30000, vae_path=...)   # images, labels, examples
    WorldExamples(work / "data-train.npz", repeat={"caption": 2, ...})            # fit(..., train_data=...)

Scene i of a split is scenes.scene_rng(seed, i), so any pool size and any split of the work gives the same
arrays. Per scene one "how many <shape>" question is kept besides "how many shapes", so counting does not
dominate. The npz holds the images once; its example rows point at their scene's image.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nanopali.tasks import SegmentationVAE
from nanopali.tasks.vqvae import crop_to_64
from nanopali.world.examples import examples
from nanopali.world.recipe.cycles import GRID, IMAGE_SIZE, REPEAT
from nanopali.world.scenes import make_scene, normalized_box, patch_labels, scene_rng

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"  # the repository's example images


def object_masks(seed: int, n_scenes: int) -> np.ndarray:
    """float32 (N, 64, 64): every object's visible mask, cropped to its box and resized as the seg encoder does."""
    r = random.Random(f"vae:{seed}")
    masks = []
    for _ in range(n_scenes):
        scene = make_scene(r, size=IMAGE_SIZE)
        masks += [crop_to_64(o.mask, normalized_box(o.box, scene.size)) for o in scene.objects]
    return np.stack(masks)


def scene_chunk(args: tuple[int, int, int, str]) -> tuple[np.ndarray, np.ndarray, list]:
    """Scenes start..stop of a seed: images uint8 (n, S, S, 3), patch labels (n, P, 3) and the example rows
    (scene, prefix, suffix)."""
    seed, start, stop, vae_path = args
    torch.set_num_threads(1)  # one process per core: torch's own threads would fight over the cores
    vae = SegmentationVAE.from_npz(vae_path)
    images, labels, rows = [], [], []
    for i in range(start, stop):
        rng = scene_rng(seed, i)
        scene = make_scene(rng, size=IMAGE_SIZE)
        images.append(np.asarray(scene.image))
        labels.append(patch_labels(scene, GRID))
        exs = examples(scene, rng, vae)
        counts = [e for e in exs if e["prefix"].startswith("answer en how many ") and "shapes" not in e["prefix"]]
        keep = rng.choice(counts) if counts else None  # one "how many <shape>" per scene besides "how many shapes"
        rows += [(i, e["prefix"], e["suffix"]) for e in exs if e not in counts or e is keep]
    return np.stack(images), np.stack(labels), rows


def write_split(out: Path, seed: int, first: int, n: int, vae_path: str, desc: str = "data") -> int:
    """Scenes first..first+n-1 of `seed` into the npz `out` (images, labels, and the example rows scene/prefix/
    suffix, scene counted from 0), made in chunks of 1000 on every core; returns the number of examples."""
    chunks = [(seed, a, min(a + 1000, first + n), vae_path) for a in range(first, first + n, 1000)]
    with Pool(os.cpu_count() or 2) as pool:  # the chunks are seeded by their scene numbers: any pool size
        parts = list(tqdm(pool.imap(scene_chunk, chunks), total=len(chunks), desc=desc))
    rows = [(i - first, prefix, suffix) for _, _, chunk in parts for i, prefix, suffix in chunk]  # rows index images
    np.savez(out, images=np.concatenate([p[0] for p in parts]), labels=np.concatenate([p[1] for p in parts]),
             scene=np.array([r[0] for r in rows]), prefix=np.array([r[1] for r in rows]),
             suffix=np.array([r[2] for r in rows]))
    return len(rows)


class WorldExamples(Sequence):
    """The examples of a data-*.npz as the trainer's {"image", "prefix", "suffix"} items, those of the
    long-answer tasks listed REPEAT[task] times per epoch; with `patch_labels=True` each item also carries
    its scene's per-patch labels (P, 3) under "patch_labels", for the trainer's auxiliary PatchLoss."""

    def __init__(self, path: Path, repeat: dict[str, int] | None = None, patch_labels: bool = False):
        data = np.load(path)
        self.images, self.scene = data["images"], data["scene"]
        self.labels = data["labels"] if patch_labels else None
        self.prefix, self.suffix = data["prefix"].tolist(), data["suffix"].tolist()
        repeat = REPEAT if repeat is None else repeat
        self.index = [i for i, prefix in enumerate(self.prefix) for _ in range(repeat.get(prefix.split()[0], 1))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i = self.index[k]
        image = Image.fromarray(self.images[self.scene[i]])
        item = {"image": image, "prefix": self.prefix[i], "suffix": self.suffix[i]}
        if self.labels is not None:
            item["patch_labels"] = self.labels[self.scene[i]]
        return item


def write_examples(n: int = 6, out: Path = EXAMPLES, seed: int = 5) -> None:
    """out/world-<i>.png: scenes of a seed used nowhere else, the first n with a word and 2+ objects."""
    out.mkdir(exist_ok=True)
    found, i = 0, 0
    while found < n:
        scene = make_scene(scene_rng(seed, i), size=IMAGE_SIZE)
        i += 1
        if scene.word and len(scene.objects) >= 2:
            scene.image.save(out / f"world-{found}.png")
            found += 1
