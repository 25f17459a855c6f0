"""Warm up a vision tower on per-patch class labels before the language model sees it.

    heads = warm_up_vision(model.vision, pixels, labels, num_classes=(8, 9, 25), steps=1500)

A from-scratch VLM whose vision tower starts random tends to learn the answer priors first and
ignore the image (the gradient reaching the tower is tiny). Training the tower alone on dense labels
(here: which shape, colour and word covers each patch, scenes.patch_labels) first gives it features
the decoder can read from its first step. One linear head per label group on the tower's output
tokens (PatchHeads), summed cross-entropies, AdamW with warm-up and cosine decay; the heads are
thrown away after. Most patches are background (class 0): `background_weight` < 1 weighs them down so
the gradient is spent on the patches that carry an object, and the log reports accuracy on those patches too.

The same heads can keep those features alive while the whole model trains: `PatchLoss` is an auxiliary
loss for the trainer (`fit(..., auxiliary=PatchLoss(...))`), on the labels each example carries.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nanopali.models.siglip import SiglipVisionModel


class PatchHeads(nn.Module):
    """One linear classifier per label group on the tower's output tokens."""

    def __init__(self, hidden_size: int, num_classes: Sequence[int], background_weight: float = 1.0):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, k) for k in num_classes)
        for g, k in enumerate(num_classes):  # class 0 (background) weighs background_weight
            self.register_buffer(f"class_weight_{g}", torch.tensor([background_weight] + [1.0] * (k - 1)), persistent=False)

    def logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """features (B, P, D) -> per group (B, P, classes), in float32."""
        return [head(features.float()) for head in self.heads]

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed (background-weighted) cross-entropies of features (B, P, D) against labels int (B, P, G)."""
        return sum(F.cross_entropy(logits.flatten(0, 1), labels[..., k].flatten(), weight=getattr(self, f"class_weight_{k}"))
                   for k, logits in enumerate(self.logits(features)))


def warm_up_vision(vision: SiglipVisionModel, pixels: torch.Tensor, labels: torch.Tensor,
                   num_classes: Sequence[int], steps: int = 1000, batch_size: int = 64, lr: float = 1e-3,
                   warmup_steps: int = 100, background_weight: float = 1.0, bf16: bool = True, seed: int = 0,
                   progress: bool = True) -> list[dict]:
    """Train `vision` in place on pixels uint8 (N, S, S, 3) and labels int (N, P, G) (P patches, G groups
    with num_classes[g] classes each); returns the logged loss and per-group accuracy every 50 steps, next to
    the accuracy of always answering the batch's most common class (labels are mostly background) and the
    accuracy on the patches whose label is not 0 (`labelled_accuracy`, NaN when a batch has none)."""
    n, patches, groups = labels.shape
    if groups != len(num_classes):
        raise ValueError(f"labels have {groups} groups but num_classes names {len(num_classes)}")
    if patches != vision.config.num_patches:
        raise ValueError(f"labels have {patches} patches per image; the tower makes {vision.config.num_patches}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = PatchHeads(vision.config.hidden_size, num_classes, background_weight)
    params = [*vision.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    vision.train()
    log = []
    bar = tqdm(range(steps), desc="vision warm-up", disable=not progress, dynamic_ncols=True)
    for step in bar:
        scale = min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(n, (batch_size,), generator=g)
        x = pixels[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S), the processor's [-1, 1]
        y = labels[idx]  # (B, P, G)
        with autocast:
            features = vision(x)  # (B, P, D)
        loss = heads.loss(features, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            with torch.no_grad():
                hits = [logits.argmax(-1) == y[..., k] for k, logits in enumerate(heads.logits(features))]
                acc = [h.float().mean().item() for h in hits]
                labelled = [h[y[..., k] > 0].float().mean().item() for k, h in enumerate(hits)]
                baseline = [torch.bincount(y[..., k].flatten()).max().item() / y[..., k].numel() for k in range(groups)]
            log.append({"step": step + 1, "loss": loss.item(), "accuracy": acc, "labelled_accuracy": labelled,
                        "majority_baseline": baseline})
    vision.eval()
    return log


class PatchLoss(PatchHeads):
    """An auxiliary loss for the trainer (loop.fit's `auxiliary`): `weight` x PatchHeads.loss against the
    per-patch labels int (P, G) each training example carries under `key` (a field of its dict item)."""

    def __init__(self, hidden_size: int, num_classes: Sequence[int], background_weight: float = 1.0,
                 weight: float = 1.0, key: str = "patch_labels"):
        super().__init__(hidden_size, num_classes, background_weight)
        self.weight, self.key = weight, key

    def forward(self, features: torch.Tensor, examples) -> torch.Tensor:
        missing = [e.source for e in examples if self.key not in e.extra]
        if missing:
            raise ValueError(f"the auxiliary patch loss needs {self.key!r} in every example; {missing} have none")
        labels = torch.stack([torch.as_tensor(e.extra[self.key]) for e in examples]).long().to(features.device)
        if labels.shape[:2] != features.shape[:2] or labels.shape[2] != len(self.heads):
            raise ValueError(f"{self.key} of shape {tuple(labels.shape[1:])} per example, but the tower makes "
                             f"{features.shape[1]} patches and there are {len(self.heads)} label groups")
        return self.weight * self.loss(features, labels)
