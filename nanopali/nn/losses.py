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


def router_losses(
    router_logits: list[torch.Tensor],              # per sparse layer: (N, E) logits, N = B·T
    top_k: int,
    attention_mask: torch.Tensor | None = None,     # (B, T), 1 = real token; padding counts for nothing
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(load-balancing loss, router z-loss, expert counts (L, E)) of a mixture-of-experts decoder's routing.

    balance = E · Σ_e f_e · P_e over all sparse layers' real tokens together, f_e the share of the top-k slots
    that chose expert e and P_e its mean router probability: the Switch Transformer / Mixtral loss, equal to
    transformers' `load_balancing_loss_func` (1 when perfectly balanced at k = 1; k at top-k). z = the mean of
    logsumexp(logits)² over the same tokens (ST-MoE). counts: real tokens routed to each expert (k per token).

    `reduce` (sum a tensor over the data-parallel processes) makes f_e and the token count those of the whole
    global batch; each process then returns its share of the global losses, which are linear in its own
    probabilities, so the processes' shares add up to (and their gradients sum to) the one-process loss.
    """
    num_experts = router_logits[0].shape[-1]
    mask = (torch.ones(router_logits[0].shape[0], device=router_logits[0].device) if attention_mask is None
            else attention_mask.reshape(-1).float())                                  # (N,)
    counts, probs, z = [], [], []
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1)                                     # (N, E)
        chosen = p.topk(top_k, dim=-1).indices.reshape(-1)                            # (N·k,)
        counts.append(torch.zeros(num_experts, device=p.device).index_add_(0, chosen, mask.repeat_interleave(top_k)))
        probs.append((p * mask[:, None]).sum(0))
        z.append((torch.logsumexp(logits.float(), dim=-1).square() * mask).sum())
    counts = torch.stack(counts)                                                      # (L, E), no gradient
    rows = mask.sum() * len(router_logits)
    if reduce is not None:
        counts, rows = reduce(counts), reduce(rows)
    balance = num_experts * (counts.sum(0) / rows * torch.stack(probs).sum(0) / rows).sum()
    return balance, torch.stack(z).sum() / rows, counts
