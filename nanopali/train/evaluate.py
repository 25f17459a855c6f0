"""Held-out evaluation during training: generate each example's answer and score it by task.

The task is the first word of the prefix (PaliGemma syntax). Every example counts toward exact
match; `answer` also gets VQA accuracy (case, punctuation and articles ignored); `detect` gets the
mean IoU of each ground-truth box with the best predicted box of the same label, and recall and
precision at IoU 0.5, through the same parser the pipeline uses.
"""

from __future__ import annotations

import string
from collections import defaultdict

import torch

from ..generate import tokenizer_settings
from ..images import load_image
from ..tasks import parse_objects


def normalize_answer(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def iou(a, b) -> float:
    """Boxes (x0, y0, x1, y1) with exclusive ends."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_scores(predicted: str, truth: str, size: tuple[int, int]) -> tuple[list[float], int]:
    """(best IoU per ground-truth object, number of predicted objects)."""
    pred, gt = parse_objects(predicted, image_size=size), parse_objects(truth, image_size=size)
    best = [max((iou(g.box, p.box) for p in pred if p.label.strip() == g.label.strip()), default=0.0) for g in gt]
    return best, len(pred)


class Means:
    """Running means of named metrics."""

    def __init__(self):
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def add(self, name: str, value: float) -> None:
        self.totals[name][0] += value
        self.totals[name][1] += 1

    def result(self) -> dict[str, float]:
        return {k: total / n for k, (total, n) in sorted(self.totals.items())}


@torch.no_grad()
def evaluate(model, processor, examples, batch_size: int = 8, max_new_tokens: int = 32) -> dict[str, float]:
    """Metrics over `examples` (train.data.Example), keyed like "caption/exact_match"."""
    was_training = model.training
    model.eval()
    means = Means()
    tok = processor.tokenizer
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        images = [load_image(e.image) for e in chunk]
        batch = processor(images=images, prompts=[e.prefix for e in chunk], padding_side="left")
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **tokenizer_settings(tok))
        for e, image, ids in zip(chunk, images, out.tolist()):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            task = e.prefix.split(maxsplit=1)[0] if e.prefix.strip() else "other"
            means.add(f"{task}/exact_match", float(text == e.suffix.strip()))
            if task == "answer":
                means.add(f"{task}/vqa_accuracy", float(normalize_answer(text) == normalize_answer(e.suffix)))
            if task == "detect":
                best, n_pred = detection_scores(text, e.suffix, image.size)
                for b in best:
                    means.add(f"{task}/mean_iou", b)
                    means.add(f"{task}/recall@0.5", float(b >= 0.5))
                if n_pred:
                    means.add(f"{task}/precision@0.5", min(sum(b >= 0.5 for b in best), n_pred) / n_pred)
    model.train(was_training)
    return means.result()
