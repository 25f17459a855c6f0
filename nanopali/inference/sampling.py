"""Choosing the next token: logit rules and sampling as pure functions of logits and a generator.

`constrain` applies what changes the distribution for every strategy (the `LogitRules`: vocabulary
limit, the never-generated `<image>` token, repetition penalty; and <eos> banned before min_new_tokens);
`pick_token` then picks greedily (temperature 0 or do_sample=False) or samples with temperature, top-k
and top-p from an explicit `torch.Generator`, so the same seed gives the same tokens (nanochat
`engine.py`, gpt-fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanopali.errors import UsageError


@dataclass(frozen=True)
class LogitRules:
    """What every decoding strategy obeys, fixed for one generate() call."""

    vocab_limit: int                 # ids >= this are never produced (padding rows of the embedding)
    eos: torch.Tensor                # long (E,) ids that end a row (banned while min_new_tokens is not reached)
    banned: tuple[int, ...] = ()     # ids never produced (e.g. <image>)
    repetition_penalty: float = 1.0  # transformers' CTRL-style penalty over the prompt and generated tokens


def constrain(
    logits: torch.Tensor,               # float (B, V)
    rules: LogitRules,
    *,
    seen: torch.Tensor | None = None,   # long (B, N) ids whose logits the repetition penalty lowers
    ban_eos: bool = False,
) -> torch.Tensor:
    logits = logits.float().clone()
    logits[:, rules.vocab_limit:] = float("-inf")
    if len(rules.banned):
        logits[:, list(rules.banned)] = float("-inf")
    if seen is not None and rules.repetition_penalty != 1.0:
        # CTRL-style, as transformers: divide positive logits by the penalty, multiply negative ones.
        picked = logits.gather(1, seen)
        picked = torch.where(picked < 0, picked * rules.repetition_penalty, picked / rules.repetition_penalty)
        logits.scatter_(1, seen, picked)
    if ban_eos:
        logits[:, rules.eos] = float("-inf")
    return logits


def top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus (smallest set with mass >= top_p) to -inf."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs             # mass of the tokens ranked above
        drop_sorted = mass_before >= top_p                     # the first token is never dropped
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_token(
    logits: torch.Tensor,                     # float (B, V), already processed
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:                            # long (B,)
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UsageError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    probs = top_k_top_p(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def model_logprobs(logits: torch.Tensor, rules: LogitRules) -> torch.Tensor:
    """log p(every token) (B, V) under the model over the real vocabulary, before the penalty or eos ban."""
    vocabulary_only = LogitRules(rules.vocab_limit, rules.eos, rules.banned)
    return constrain(logits, vocabulary_only).log_softmax(-1)
