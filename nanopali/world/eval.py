"""Score a model on held-out toy-world scenes (world/scenes.py) with greedy decoding.

    metrics = evaluate_world(nanopali.load("ckpt"), n_scenes=1000, seed=3)
    python -m nanopali.world.eval ckpt --n 200 --seed 3

Scene i is drawn from scenes.scene_rng(seed, i) (the world's one convention, so a seed never used for
training is a held-out set) and every example `examples.examples` gives for it is asked, batched by
task. Tasks, text matching and box IoU are train/metrics.py's (shared with training's evaluation);
COCO mAP and mask IoU are this evaluator's own. The metrics, each in [0, 1]:

    vqa/how many, vqa/what color,    VQA accuracy per question type: normalize_answer(prediction) equals
    vqa/what shape, vqa/where        normalize_answer(truth) (case, punctuation, articles ignored);
                                     vqa/accuracy over all questions.
    caption/exact_match              normalized string equality, as for VQA.
    detect/map50                     COCO mAP at IoU 0.5 (pycocotools, stats[1]) over the SHAPES categories.
                                     Each detect example is one COCO image; its ground truth is every scene
                                     object of the prompted shapes (the boxes its suffix encodes); predictions
                                     are the parsed boxes scored by the geometric mean of their tokens'
                                     probabilities (pipeline.scored_objects).
    segment/miou                     mean over segment examples of the IoU between the first predicted mask
                                     (decoded with pali.vae, pasted into the image) and the object's visible
                                     mask; no parseable mask counts as 0.
    ocr/exact_match                  the stripped prediction equals the word.

"n/<task>" (and "n/vqa/<type>") count the examples. Metrics of a task without examples are left out.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from nanopali.pipeline import scored_objects
from nanopali.train.metrics import best_ious, exact_match, task_of, vqa_match
from nanopali.world.examples import description, examples
from nanopali.world.scenes import SHAPES, Scene, make_scene, scene_rng

TASKS = ("vqa", "caption", "detect", "segment", "ocr")


def detection_map50(images: list[tuple[int, int]], truths: list[list], predictions: list[list]) -> float:
    """COCO mAP@0.5 over SHAPES. images: (W, H) per image; truths: [(shape, (x0, y0, x1, y1))] per image;
    predictions: [(shape, box, score)] per image. Labels outside SHAPES are ignored."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat = {s: k + 1 for k, s in enumerate(SHAPES)}
    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]  # noqa: E731
    gt = []
    for i, objs in enumerate(truths):
        for s, b in objs:  # ids from 1: COCOeval reads a matched id of 0 as "unmatched"
            gt.append({"id": len(gt) + 1, "image_id": i + 1, "category_id": cat[s], "bbox": xywh(b),
                       "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0})
    dets = [{"image_id": i + 1, "category_id": cat[s], "bbox": xywh(b), "score": float(score)}
            for i, objs in enumerate(predictions) for s, b, score in objs if s in cat]
    if not gt or not dets:  # loadRes cannot take an empty list; no detections (or no truth) is 0
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every step
        coco = COCO()
        coco.dataset = {"images": [{"id": i + 1, "width": w, "height": h} for i, (w, h) in enumerate(images)],
                        "annotations": gt, "categories": [{"id": k, "name": s} for s, k in cat.items()]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(0.0, float(ev.stats[1]))  # -1 when no category has truth


def evaluate_world(pali, n_scenes: int = 1000, seed: int = 3, size: int = 128, batch_size: int = 32,
                   max_new_tokens: int = 40, progress: bool = False, tasks=TASKS, return_records: bool = False):
    """Metrics (see the module docstring) of `pali` (a nanopali.Pali) on n_scenes held-out scenes.

    Each task's examples go through `pali.generate_spans` (the pipeline's batched, per-row-prompt generation, which also
    gives the tokens' log-probabilities for detection scores) in batches of batch_size, greedy. detect/map50
    needs pycocotools. tasks: a subset of TASKS to ask. return_records=True returns (metrics, records), one record per example:
    {"scene", "task", "prefix", "truth", "prediction", "score"}, score being the example's 0/1 match, its mask
    IoU (segment) or the mean best same-label box IoU of its truth objects (detect).
    """
    if unknown := set(tasks) - set(TASKS):
        raise ValueError(f"unknown tasks {sorted(unknown)}; the tasks are {TASKS}")
    scenes, todo = [], defaultdict(list)  # task family -> [(scene index, example)]
    for i in range(n_scenes):
        rng = scene_rng(seed, i)
        scenes.append(make_scene(rng, size=size))
        for ex in examples(scenes[-1], rng, pali.vae if "segment" in tasks else None):
            family = task_of(ex["prefix"]).split("/")[0]
            if family in tasks:
                todo[family].append((i, ex))

    records, det = [], ([], [], [])  # det: image sizes, truths, predictions of the detect examples
    bar = tqdm(total=sum(map(len, todo.values())), desc="world eval", disable=not progress)
    for family, items in todo.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            images = [scenes[i].image for i, _ in chunk]
            answers = pali.generate_spans(images, [ex["prefix"] for _, ex in chunk], "generate", max_new_tokens=max_new_tokens)
            for (i, ex), (text, spans) in zip(chunk, answers):
                text = text.strip()
                score = _score(family, ex["prefix"], text, ex["suffix"], spans, scenes[i], pali.vae, det)
                records.append({"scene": i, "task": task_of(ex["prefix"]), "prefix": ex["prefix"],
                                "truth": ex["suffix"], "prediction": text, "score": score})
            bar.update(len(chunk))
    bar.close()

    metrics, by_task = {}, defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r["score"])
        if r["task"].startswith("vqa/"):
            by_task["vqa"].append(r["score"])
    names = {"vqa": "vqa/accuracy", "caption": "caption/exact_match", "ocr": "ocr/exact_match",
             "segment": "segment/miou"}
    for task, scores in sorted(by_task.items()):
        metrics[f"n/{task}"] = len(scores)
        if task in names or task.startswith("vqa/"):
            metrics[names.get(task, task)] = float(np.mean(scores))
    for family in tasks:
        metrics.setdefault(f"n/{family}", 0)
    if det[0]:
        metrics["detect/map50"] = detection_map50(*det)
    metrics = dict(sorted(metrics.items(), key=lambda kv: (kv[0].startswith("n/"), kv[0])))  # metrics, then counts
    return (metrics, records) if return_records else metrics


def _score(family: str, prefix: str, text: str, truth: str, spans, scene: Scene, vae, det: tuple) -> float:
    """One example's score (see evaluate_world); a detect example's image size, truth and scored predictions
    are also appended to `det`, for the mAP."""
    if family in ("vqa", "caption"):
        return vqa_match(text, truth)
    if family == "ocr":
        return exact_match(text, truth)
    if family == "detect":
        labels = [s.strip() for s in prefix[len("detect "):].split(";")]
        gt = [(o.shape, o.box) for s in labels for o in scene.objects if o.shape == s]
        pred = [(o.label, o.box, o.score) for o in scored_objects(text, spans, scene.size)]
        for lst, item in zip(det, (scene.size, gt, pred)):
            lst.append(item)
        return float(np.mean(best_ious(gt, [(label, box) for label, box, _ in pred])))
    name = prefix[len("segment "):].strip()  # segment: the one object whose description is the prompt
    obj = next(o for o in scene.objects if description(o, scene.objects) == name)
    masks = [o.mask for o in scored_objects(text, spans, scene.size, vae) if o.mask is not None]
    return _mask_iou(masks[0], obj.mask) if masks else 0.0


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


if __name__ == "__main__":
    import argparse

    import torch

    from nanopali.pipeline import load

    p = argparse.ArgumentParser(description="Score a checkpoint on held-out toy-world scenes (greedy).")
    p.add_argument("model", help="checkpoint directory (vae-oid.npz beside it enables segment)")
    p.add_argument("--n", type=int, default=200, help="number of scenes")
    p.add_argument("--seed", type=int, default=3, help="world seed (use one the model was not trained on)")
    p.add_argument("--size", type=int, default=128, help="scene side in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    result = evaluate_world(load(args.model, device=args.device), n_scenes=args.n, seed=args.seed, size=args.size,
                            batch_size=args.batch_size, progress=True, tasks=args.tasks)
    for key, value in result.items():
        print(f"{key:24s} {value:8.4f}" if isinstance(value, float) else f"{key:24s} {value:8d}")
