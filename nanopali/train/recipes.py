"""What trains and how fast: freezing recipes as patterns over parameter names, AdamW groups, schedule.

Recipes (big_vision's PaliGemma transfer configs freeze the same way, by name patterns):

    full             every parameter
    freeze-vision    everything but the SigLIP tower
    attention-only   only the decoder's attention projections (big_vision's low-memory recipe)
    projector-only   only the linear projector (the alignment stage)

and for a contrastive SigLIP (CONTRASTIVE_RECIPES): full; freeze-vision (LiT, "locked-image tuning": the text
tower, temperature and bias learn to match a fixed image tower); freeze-vision-encoder (the same, but the image
tower's attention-pooling head learns too: for a tower that comes without a trained head, e.g. PaliGemma's);
freeze-text (the other way round).

Weight decay is decoupled (AdamW) and skips norms, biases and embeddings. `lr_scale` multiplies
the learning rate of parameters matching a pattern, e.g. {"multi_modal_projector.*": 10}.
The schedule is a linear warm-up to the peak learning rate, then a cosine down to min_lr_ratio.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch

from nanopali.errors import UsageError

RECIPES: dict[str, tuple[str, ...]] = {
    "full": ("*",),
    "freeze-vision": ("multi_modal_projector.*", "language_model.*"),
    "attention-only": ("language_model.model.layers.*.self_attn.*",),
    "projector-only": ("multi_modal_projector.*",),
}
CONTRASTIVE_RECIPES: dict[str, tuple[str, ...]] = {
    "full": ("*",),
    "freeze-vision": ("text_model.*", "logit_*"),
    "freeze-vision-encoder": ("text_model.*", "logit_*", "vision_model.head.*"),
    "freeze-text": ("vision_model.*", "logit_*"),
}
NO_DECAY = ("*norm*", "*.bias", "*embed_tokens*", "*position_embedding*", "*token_embedding*", "logit_*", "*.probe")


def _matches(name: str, patterns) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def apply_recipe(model: torch.nn.Module, recipe: str, recipes: dict[str, tuple[str, ...]] = RECIPES) -> list[str]:
    """Freeze every parameter the recipe (of `recipes`) does not name; return the names left trainable."""
    if recipe not in recipes:
        raise UsageError(f"unknown recipe {recipe!r}; known recipes: {', '.join(recipes)}")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(_matches(name, recipes[recipe]))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups over the trainable parameters: one per (decay?, learning-rate scale)."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not _matches(name, NO_DECAY)
        scale = next((s for pattern, s in (lr_scale or {}).items() if fnmatchcase(name, pattern)), 1.0)
        group = groups.setdefault((decay, scale), {"params": [], "names": [], "lr": lr * scale,
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise UsageError("no trainable parameters: the recipe froze everything")
    return list(groups.values())


def optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, lr_scale=None,
              betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, lr_scale)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr, betas=betas, eps=eps)


def schedule(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warm-up from 0 over warmup_steps, then cosine decay to min_lr_ratio at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
