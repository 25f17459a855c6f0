"""Held-out evaluation during training: generate each example's answer and score it by task.

The task is the first word of the prefix (PaliGemma syntax). Every example counts toward exact
match; `answer` also gets VQA accuracy (case, punctuation and articles ignored); `detect` gets the
mean IoU of each ground-truth box with the best predicted box of the same label, and recall and
precision at IoU 0.5, through the same parser the pipeline uses. The scoring is train/metrics.py's,
shared with the toy world's evaluator.
"""

from __future__ import annotations

import torch

from nanopali.inference.answers import generate_answers
from nanopali.inputs.images import load_image
from nanopali.train.metrics import Means, answer_metrics


@torch.no_grad()
def evaluate(model, processor, examples, batch_size: int = 8, max_new_tokens: int = 32) -> dict[str, float]:
    """Metrics over `examples` (train.data.Example), keyed like "caption/exact_match"."""
    was_training = model.training
    model.eval()
    means = Means()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        images = [load_image(e.image) for e in chunk]
        answers = generate_answers(model, processor, images, [e.prefix for e in chunk], max_new_tokens=max_new_tokens)
        for e, image, answer in zip(chunk, images, answers):
            for name, value in answer_metrics(e.prefix, answer.text.strip(), e.suffix, image.size):
                means.add(name, value)
    model.train(was_training)
    return means.result()
