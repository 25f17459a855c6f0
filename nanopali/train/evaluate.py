"""Held-out evaluation during training: generate each example's answer and score it by task (PaliGemma), or
retrieve and classify zero-shot (a contrastive SigLIP, `evaluate_contrastive`).

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
from nanopali.train.metrics import Means, answer_metrics, retrieval_recalls


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


@torch.no_grad()
def evaluate_contrastive(model, processor, pairs, batch_size: int = 32) -> dict[str, float]:
    """Recall@1/5 image->text and text->image among the distinct texts of `pairs` (train.data.Pair; metrics.py's
    retrieval_recalls), and, when pairs carry a "label" in `extra`, zero-shot accuracy: each such image classified
    among all the distinct labels (the label itself as the text), right when its own label scores highest."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    images = []
    for i in range(0, len(pairs), batch_size):
        pixels = processor.preprocess_images([load_image(p.image) for p in pairs[i:i + batch_size]])
        images.append(F.normalize(model.get_image_features(pixels.to(model.device)).float(), dim=-1))
    images = torch.cat(images)

    def embed(texts):
        ids = processor.encode_texts(texts)
        return torch.cat([F.normalize(model.get_text_features(ids[i:i + batch_size].to(model.device)).float(), dim=-1)
                          for i in range(0, len(ids), batch_size)])

    texts = sorted({p.text for p in pairs})
    result = retrieval_recalls(model.logits(images, embed(texts)).cpu(), [p.text for p in pairs], texts)
    labelled = [i for i, p in enumerate(pairs) if isinstance(p.extra.get("label"), str)]
    if labelled:
        labels = sorted({pairs[i].extra["label"] for i in labelled})
        best = model.logits(images[labelled], embed(labels)).argmax(1).cpu()
        truth = torch.tensor([labels.index(pairs[i].extra["label"]) for i in labelled])
        result["zero_shot/accuracy"] = (best == truth).float().mean().item()
    model.train(was_training)
    return result
