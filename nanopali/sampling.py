"""Choosing the next token: logit processing and sampling as pure functions of logits and a generator.

`process` applies what changes the distribution for every strategy (vocabulary limit, the never-
generated `<image>` token, min_new_tokens, repetition penalty); `choose` then picks greedily
(temperature 0 or do_sample=False) or samples with temperature, top-k and top-p from an explicit
`torch.Generator`, so the same seed gives the same tokens (nanochat `engine.py`, gpt-fast).
"""

from __future__ import annotations

import torch


def process(
    logits: torch.Tensor,               # float (B, V)
    *,
    vocab_limit: int,                   # ids >= this are never produced (padding rows of the embedding)
    banned: list[int] = (),             # ids never produced (e.g. <image>)
    seen: torch.Tensor | None = None,   # long (B, N) ids whose logits the repetition penalty lowers
    repetition_penalty: float = 1.0,
    eos: torch.Tensor | None = None,    # long (E,) ids banned while min_new_tokens is not reached
    ban_eos: bool = False,
) -> torch.Tensor:
    logits = logits.float().clone()
    logits[:, vocab_limit:] = float("-inf")
    if len(banned):
        logits[:, list(banned)] = float("-inf")
    if seen is not None and repetition_penalty != 1.0:
        # CTRL-style, as transformers: divide positive logits by the penalty, multiply negative ones.
        picked = logits.gather(1, seen)
        picked = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
        logits.scatter_(1, seen, picked)
    if ban_eos and eos is not None:
        logits[:, eos] = float("-inf")
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


def choose(
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
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    probs = top_k_top_p(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def model_logprobs(logits: torch.Tensor, token: torch.Tensor, rules: dict) -> torch.Tensor:
    """log p(token) under the model over the real vocabulary, before any sampling rule: (B,)."""
    scores = process(logits, vocab_limit=rules["vocab_limit"], banned=rules["banned"])
    return scores.log_softmax(-1).gather(1, token[:, None])[:, 0]
