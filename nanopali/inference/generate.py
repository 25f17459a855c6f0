"""Generation strategies on top of decode.py: greedy, sampling (temperature / top-k / top-p) and beams.

    generate(model, **processor_batch, max_new_tokens=32, ...)  -> new tokens (B, N)

Each row stops at <eos> or a stop string on its own; finished rows are filled with the pad id.
This module only uses the model's pieces (embed, decoder). Task logic (boxes, masks) never enters this loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nanopali.errors import UsageError
from nanopali.inference.beam import beam_search
from nanopali.inference.decode import prefill
from nanopali.inference.runtime import Runtime
from nanopali.inference.sampling import LogitRules, constrain, model_logprobs, pick_token
from nanopali.models.paligemma import PaliGemma


@dataclass
class GenerateOutput:
    tokens: torch.Tensor    # long (B, N): new tokens, pad id after <eos>
    logprobs: torch.Tensor  # float (B, N): log-probability of each token under the model (0 on padding)


def tokenizer_settings(tokenizer) -> dict:
    """The generate() arguments a tokenizer fixes: its <eos> and pad ids and its vocabulary size (real
    checkpoints have 257216 embedding rows for 257153 tokens: the rest are padding, never generated)."""
    return {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "vocab_limit": tokenizer.vocab_size}


def _rules(model: PaliGemma, device, eos_token_id, pad_token_id, vocab_limit, repetition_penalty) -> tuple[LogitRules, int]:
    """The LogitRules and pad id of one call; vocab_limit None = every embedding row is a token."""
    text = model.config.text_config
    eos = [text.eos_token_id] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    image = model.config.image_token_index
    rules = LogitRules(vocab_limit=vocab_limit or text.vocab_size, eos=torch.tensor(eos, dtype=torch.long, device=device),
                       banned=(image,) if image < text.vocab_size else (), repetition_penalty=repetition_penalty)
    return rules, text.pad_token_id if pad_token_id is None else pad_token_id


@torch.no_grad()
def generate_tokens(
    model: PaliGemma,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    vocab_limit: int | None = None,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    with_logprobs: bool = False,
    runtime: Runtime | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (token (B,), logprob (B,) or None) once per step: the streaming form of `generate`.

    A row's tokens after its <eos> (or stop string) are the pad id with log-probability 0; the
    iteration ends when every row is done or after max_new_tokens.

    max_new_tokens / min_new_tokens: bounds on the number of new tokens per row.
    do_sample, temperature, top_k, top_p, generator: sampling (greedy when do_sample=False or temperature=0).
    repetition_penalty: transformers' CTRL-style penalty over the prompt and the generated tokens.
    eos_token_id (int or list), pad_token_id: default to the config's.
    vocab_limit: ids >= this are never produced (default: none; `tokenizer_settings` gives the tokenizer's size);
    `<image>` never is.
    stop_strings + tokenizer: a row also stops once its decoded text contains one of the strings.
    runtime: how the model runs (inference/runtime.py: `prepare`'s result); default Runtime().
    """
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise UsageError("stop_strings needs the tokenizer to decode the generated text")
    rules, pad = _rules(model, input_ids.device, eos_token_id, pad_token_id, vocab_limit, repetition_penalty)
    logits, state = prefill(model, input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens,
                            runtime=runtime)
    seen = input_ids if repetition_penalty != 1.0 else None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    so_far = []
    for step in range(max_new_tokens):
        scores = constrain(logits, rules, seen=seen, ban_eos=step < min_new_tokens)
        token = pick_token(scores, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=generator)
        token = token.masked_fill(done, pad)
        logprob = (model_logprobs(logits, rules).gather(1, token[:, None])[:, 0].masked_fill(done, 0.0)
                   if with_logprobs else None)
        yield token, logprob
        done = done | torch.isin(token, rules.eos)
        if stop_strings:
            so_far.append(token)
            done = done | _hit_stop_string(torch.stack(so_far, 1), done, tokenizer, stop_strings)
        if done.all() or step == max_new_tokens - 1:
            return
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], 1)
        logits = state.step(model, token)


@torch.no_grad()
def generate(
    model: PaliGemma,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    return_logprobs: bool = False,
    labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | GenerateOutput:
    """Generate up to max_new_tokens per row. Returns the new tokens (B, N), N <= max_new_tokens.

    Each row stops on its own; finished rows are filled with the pad id. num_beams > 1 runs beam
    search (with length_penalty). return_logprobs=True returns GenerateOutput(tokens, logprobs), the
    model's log-probability of each token over the real vocabulary. `labels` (from a processor
    call with suffixes) is accepted and ignored. The other arguments are `generate_tokens`'.
    """
    if num_beams > 1:
        unsupported = {k for k in ("do_sample", "stop_strings", "tokenizer", "generator", "top_k", "top_p", "temperature")
                       if kwargs.get(k)}
        if unsupported:
            raise UsageError(f"beam search does not support {sorted(unsupported)}; use num_beams=1 for them")
        rules, pad = _rules(model, input_ids.device, kwargs.pop("eos_token_id", None), kwargs.pop("pad_token_id", None),
                            kwargs.pop("vocab_limit", None), kwargs.pop("repetition_penalty", 1.0))
        tokens, logprobs = beam_search(
            model, input_ids, pixel_values, attention_mask, token_type_ids, num_beams=num_beams,
            length_penalty=length_penalty, pad=pad, rules=rules, max_new_tokens=kwargs.pop("max_new_tokens", 32),
            min_new_tokens=kwargs.pop("min_new_tokens", 0), **kwargs)
        return GenerateOutput(tokens, logprobs) if return_logprobs else tokens
    steps = list(generate_tokens(model, input_ids, pixel_values, attention_mask, token_type_ids,
                                 with_logprobs=return_logprobs, **kwargs))
    tokens = torch.stack([t for t, _ in steps], 1)
    return GenerateOutput(tokens, torch.stack([lp for _, lp in steps], 1)) if return_logprobs else tokens


def _hit_stop_string(tokens: torch.Tensor, done: torch.Tensor, tokenizer, stop_strings: list[str]) -> torch.Tensor:
    hit = torch.zeros_like(done)
    for row in (~done).nonzero().flatten().tolist():
        text = tokenizer.decode(tokens[row].tolist())
        hit[row] = any(s in text for s in stop_strings)
    return hit
