"""The prefix-LM training loss: next-token cross-entropy on the suffix only.

Position t predicts labels[t + 1]; labels are -100 on the prefix and on padding (the processor
makes them so), and only the labelled positions go through the output head, so a 256-token image
prefix costs no (T, 257216) logits. Two reductions:

    "token"    sum over all labelled tokens / their number          (transformers' default)
    "example"  mean over each example's tokens, then over examples  (big_vision's)

`denominator` overrides the divisor so that gradient accumulation and data-parallel ranks can
divide by the count over the whole global batch, which makes them equal to one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("token", "example")


def supervised(labels: torch.Tensor) -> torch.Tensor:
    """bool (B, T-1): positions whose next token is a label."""
    return labels[:, 1:] != IGNORE_INDEX


def count(labels: torch.Tensor, reduction: str) -> int:
    """The natural divisor of `reduction` for this batch: labelled tokens, or examples with a label."""
    keep = supervised(labels)
    return int(keep.sum()) if reduction == "token" else int(keep.any(1).sum())


def suffix_loss(
    hidden: torch.Tensor,                           # (B, T, D) final hidden states
    labels: torch.Tensor,                           # long (B, T), IGNORE_INDEX where there is no target
    head: Callable[[torch.Tensor], torch.Tensor],   # (K, D) -> (K, V) logits
    reduction: str = "token",
    label_smoothing: float = 0.0,
    denominator: float | None = None,
) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; use one of {REDUCTIONS}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the inputs are {tuple(hidden.shape[:2])}")
    keep = supervised(labels)                                         # (B, T-1)
    logits = head(hidden[:, :-1][keep]).float()                       # (K, V)
    losses = F.cross_entropy(logits, labels[:, 1:][keep], reduction="none", label_smoothing=label_smoothing)  # (K,)
    if reduction == "token":
        return losses.sum() / (denominator if denominator is not None else max(int(keep.sum()), 1))
    rows = keep.nonzero()[:, 0]
    per_example = torch.zeros(labels.shape[0], device=losses.device).index_add(0, rows, losses)
    tokens = keep.sum(1)
    has = tokens > 0
    return (per_example[has] / tokens[has]).sum() / (denominator if denominator is not None else max(int(has.sum()), 1))
