"""The toy world for the contrastive SigLIP: the texts a scene is paired with, and the held-out scores.

    texts = pair_texts(scene, rng)        # ["a red circle above a blue square", "two shapes", "a blue square"]
    evaluate_world_contrastive(clip)      # zero-shot colour / shape / count accuracy, caption retrieval recall

Training pairs each scene with three texts: its caption (world/examples.py), how many shapes it holds
("three shapes") and the label of one of its objects ("a blue square"). The held-out scores on n scenes of a seed
no training draw uses:
    zero_shot/color   scenes with one object: the 8 prompts "a <colour> <its shape>", right when its colour wins
    zero_shot/shape   scenes with one object: the 7 prompts "a <its colour> <shape>"
    zero_shot/count   every scene: "one shape" ... "four shapes"
    i2t/recall@k, t2i/recall@k   the scenes' captions as the texts (train/metrics.py retrieval_recalls: a caption
                      that several scenes share counts for each of them)
"""

from __future__ import annotations

from nanopali.train.metrics import retrieval_recalls
from nanopali.world.examples import _article, caption
from nanopali.world.scenes import COLORS, NUMBERS, SHAPES, Scene, as_random, make_scene, scene_rng

COUNTS = tuple(f"{NUMBERS[n]} shape{'s' if n > 1 else ''}" for n in range(1, 5))


def count_text(scene: Scene) -> str:
    return COUNTS[len(scene.objects) - 1]


def pair_texts(scene: Scene, rng) -> list[str]:
    """The texts paired with a scene for training: caption, count, one object's label (drawn with `rng`)."""
    obj = as_random(rng).choice(scene.objects)
    return [caption(scene), count_text(scene), _article(obj.label)]


def zero_shot_tasks(scene: Scene) -> dict[str, tuple[list[str], int]]:
    """task -> (prompts, index of the true one) for the zero-shot tasks that apply to the scene."""
    tasks = {"count": (list(COUNTS), len(scene.objects) - 1)}
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        tasks["color"] = ([_article(f"{c} {obj.shape}") for c in COLORS], list(COLORS).index(obj.color))
        tasks["shape"] = ([_article(f"{obj.color} {s}") for s in SHAPES], SHAPES.index(obj.shape))
    return tasks


def evaluate_world_contrastive(clip, n_scenes: int = 1000, seed: int = 3, size: int = 128) -> dict[str, float]:
    """The scores of the module docstring for `clip` (a nanopali.zero_shot.Contrastive) on scenes 0..n-1 of `seed`."""
    scenes = [make_scene(scene_rng(seed, i), size=size) for i in range(n_scenes)]
    images = clip.embed_images([s.image for s in scenes])
    captions = [caption(s) for s in scenes]
    texts = sorted(set(captions))
    metrics = retrieval_recalls(clip.logits(images, clip.embed_texts(texts)), captions, texts)
    prompts = sorted({p for s in scenes for prompts, _ in zero_shot_tasks(s).values() for p in prompts})
    logits = clip.logits(images, clip.embed_texts(prompts))
    column = {p: j for j, p in enumerate(prompts)}
    right: dict[str, list[bool]] = {}
    for i, scene in enumerate(scenes):
        for task, (options, truth) in zero_shot_tasks(scene).items():
            scores = logits[i, [column[p] for p in options]]
            right.setdefault(task, []).append(int(scores.argmax()) == truth)
    for task in ("color", "shape", "count"):
        metrics[f"zero_shot/{task}"] = sum(right.get(task, [])) / max(len(right.get(task, [])), 1)
        metrics[f"n/{task}"] = len(right.get(task, []))
    metrics["n/captions"] = len(texts)
    return metrics
