"""Warm up a vision tower on per-patch class labels before the language model sees it.

    heads = warm_up_vision(model.vision, pixels, labels, num_classes=(8, 9, 25), steps=1500)

A from-scratch VLM whose vision tower starts random tends to learn the answer priors first and
ignore the image (the gradient reaching the tower is tiny). Training the tower alone on dense labels
(here: which shape, colour and word covers each patch, world.patch_labels) first gives it features
the decoder can read from its first step. One linear head per label group on the tower's output
tokens, summed cross-entropies, AdamW with warm-up and cosine decay; the heads are thrown away after.
Most patches are background (class 0): `background_weight` < 1 weighs them down so the gradient is
spent on the patches that carry an object, and the log reports accuracy on those patches too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..vision import SiglipVisionModel


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
    heads = nn.ModuleList(nn.Linear(vision.config.hidden_size, k) for k in num_classes)
    class_weights = [torch.tensor([background_weight] + [1.0] * (k - 1)) for k in num_classes]
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
        losses = [F.cross_entropy(head(features.float()).flatten(0, 1), y[..., k].flatten(), weight=class_weights[k])
                  for k, head in enumerate(heads)]
        loss = sum(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            with torch.no_grad():
                hits = [head(features.float()).argmax(-1) == y[..., k] for k, head in enumerate(heads)]
                acc = [h.float().mean().item() for h in hits]
                labelled = [h[y[..., k] > 0].float().mean().item() for k, h in enumerate(hits)]
                baseline = [torch.bincount(y[..., k].flatten()).max().item() / y[..., k].numel() for k in range(groups)]
            log.append({"step": step + 1, "loss": loss.item(), "accuracy": acc, "labelled_accuracy": labelled,
                        "majority_baseline": baseline})
    vision.eval()
    return log
