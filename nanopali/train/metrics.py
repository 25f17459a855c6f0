"""Scoring generated answers against the truth: the core shared by training's held-out evaluation and the world's.

    task_of("answer en where is the red circle?")      # "vqa/where"; family_of(...) -> "answer"
    vqa_match(" A circle.", "circle")                  # 1.0: case, punctuation and articles ignored
    best_ious([("cat", box)], [("cat", box2)])         # best same-label IoU per true object
    answer_metrics(prefix, prediction, truth, size)    # training's metrics of one example
    retrieval_recalls(logits, image_texts, texts)       # contrastive models: recall@k image->text and text->image

Both evaluators (train/evaluate.py during `fit`, world/eval.py on generated scenes) name tasks, compare
text and match boxes through these functions, so a metric means the same thing in both places.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence

from nanopali.tasks import parse_objects

Box = Sequence[float]  # (x0, y0, x1, y1) pixels, exclusive ends


def family_of(prefix: str) -> str:
    """The task of a PaliGemma prompt, its first word: "detect star ; circle" -> "detect"; "other" when empty."""
    words = prefix.split()
    return words[0] if words else "other"


def task_of(prefix: str) -> str:
    """The family, VQA split by question type: "answer en where is the red circle?" -> "vqa/where";
    "answer en how many ..." -> "vqa/how many"; "detect star ; circle" -> "detect"."""
    family = family_of(prefix)
    if family != "answer":
        return family
    words = prefix.split()
    return "vqa/where" if words[2] == "where" else "vqa/" + " ".join(words[2:4])


def normalize_answer(text: str) -> str:
    """Lower case, without punctuation and the articles a/an/the, single spaces (VQA-style matching)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the two texts are equal up to surrounding whitespace, else 0.0."""
    return float(prediction.strip() == truth.strip())


def vqa_match(prediction: str, truth: str) -> float:
    """1.0 when the two texts are equal after normalize_answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def iou(a: Box, b: Box) -> float:
    """Intersection over union of boxes (x0, y0, x1, y1) with exclusive ends."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_ious(truth: Sequence[tuple[str, Box]], predicted: Sequence[tuple[str, Box]]) -> list[float]:
    """Per true (label, box): the best IoU of a predicted box with the same label (0.0 when there is none)."""
    return [max((iou(box, p) for name, p in predicted if name.strip() == label.strip()), default=0.0)
            for label, box in truth]


def detection_scores(predicted: str, truth: str, size: tuple[int, int]) -> tuple[list[float], int]:
    """(best IoU per ground-truth object, number of predicted objects) of two detect answers, both parsed
    with the pipeline's parser at image size (W, H)."""
    pred, gt = parse_objects(predicted, image_size=size), parse_objects(truth, image_size=size)
    return best_ious([(g.label, g.box) for g in gt], [(p.label, p.box) for p in pred]), len(pred)


def answer_metrics(prefix: str, prediction: str, truth: str, size: tuple[int, int]) -> list[tuple[str, float]]:
    """Training's metrics of one generated answer, as ("<family>/<metric>", value) pairs to average: every
    example exact_match; `answer` also vqa_accuracy; `detect` mean_iou and recall@0.5 per true object and,
    when it predicted any, precision@0.5."""
    task = family_of(prefix)
    out = [(f"{task}/exact_match", exact_match(prediction, truth))]
    if task == "answer":
        out.append((f"{task}/vqa_accuracy", vqa_match(prediction, truth)))
    if task == "detect":
        best, n_pred = detection_scores(prediction, truth, size)
        for b in best:
            out += [(f"{task}/mean_iou", b), (f"{task}/recall@0.5", float(b >= 0.5))]
        if n_pred:
            out.append((f"{task}/precision@0.5", min(sum(b >= 0.5 for b in best), n_pred) / n_pred))
    return out


def retrieval_recalls(logits, image_texts: Sequence[str], texts: Sequence[str], ks=(1, 5)) -> dict[str, float]:
    """Recall@k both ways of an (N_img, N_txt) similarity matrix against distinct `texts`, image i's own text being
    image_texts[i]. Captions repeat (two images of "a red circle"), so the texts are distinct and a text's match is
    any image whose own text it is: image->text hits when its text is among the top k; text->image when one of the
    top k images has that text (averaged over the texts)."""
    import torch

    column = {t: j for j, t in enumerate(texts)}
    gold = torch.tensor([column[t] for t in image_texts])                         # (N_img,)
    relevant = gold[:, None] == torch.arange(len(texts))[None, :]                  # (N_img, N_txt)
    out = {}
    for k in ks:
        top_texts = logits.topk(min(k, len(texts)), dim=1).indices                 # (N_img, k)
        out[f"i2t/recall@{k}"] = (top_texts == gold[:, None]).any(1).float().mean().item()
        top_images = logits.topk(min(k, len(image_texts)), dim=0).indices          # (k, N_txt)
        out[f"t2i/recall@{k}"] = relevant.gather(0, top_images).any(0).float().mean().item()
    return out


class Means:
    """Running means of named metrics."""

    def __init__(self):
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def add(self, name: str, value: float) -> None:
        self.totals[name][0] += value
        self.totals[name][1] += 1

    def result(self) -> dict[str, float]:
        return {k: total / n for k, (total, n) in sorted(self.totals.items())}
