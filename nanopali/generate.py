"""Generation strategies on top of decode.py: greedy, sampling (temperature / top-k / top-p) and beams.

    generate(model, **processor_batch, max_new_tokens=32, ...)  -> new tokens (B, N)

Each row stops at <eos> or a stop string on its own; finished rows are filled with the pad id.
This module only uses the model's pieces (embed, decoder); model.py exposes it as `model.generate`.
Task logic (boxes, masks) never enters this loop.
"""

from __future__ import annotations

import torch

from .beam import beam_search
from .decode import GenerateOutput, prefill
from .sampling import choose, model_logprobs, process


def default_vocab_limit(model) -> int:
    """In every published checkpoint `<image>` is the first id past the real vocabulary."""
    image, rows = model.config.image_token_index, model.config.text_config.vocab_size
    return image if image < rows else rows


@torch.no_grad()
def generate(
    model,
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
    num_beams: int = 1,
    length_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    vocab_limit: int | None = None,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    return_logprobs: bool = False,
    **ignored,
) -> torch.Tensor | GenerateOutput:
    """Generate up to max_new_tokens per row. Returns the new tokens (B, N), N <= max_new_tokens.

    Each row stops at <eos> (or at one of `stop_strings`, which needs `tokenizer`) on its own;
    finished rows are filled with the pad id. Tokens >= vocab_limit (default: the `<image>` id of
    published checkpoints, see `default_vocab_limit`) and `<image>` itself are never produced.
    `labels` and other processor outputs that do not matter for generation are ignored.
    """
    if ignored.keys() - {"labels"}:
        raise TypeError(f"generate() got unexpected arguments {sorted(ignored.keys() - {'labels'})}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer to decode the generated text")
    text = model.config.text_config
    eos = torch.tensor([text.eos_token_id] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long, device=input_ids.device)
    pad = text.pad_token_id if pad_token_id is None else pad_token_id
    rules = dict(vocab_limit=vocab_limit or default_vocab_limit(model), banned=[model.config.image_token_index]
                 if model.config.image_token_index < text.vocab_size else [], repetition_penalty=repetition_penalty, eos=eos)
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam search with sampling is not supported; use num_beams=1 with do_sample=True")
        return beam_search(model, input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens=max_new_tokens,
                           min_new_tokens=min_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                           pad=pad, rules=rules, return_logprobs=return_logprobs)

    logits, state = prefill(model, input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens)
    B = input_ids.shape[0]
    seen = input_ids if repetition_penalty != 1.0 else None
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        scores = process(logits, seen=seen, ban_eos=step < min_new_tokens, **rules)
        token = choose(scores, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = token.masked_fill(done, pad)
        tokens.append(token)
        if return_logprobs:
            logprobs.append(model_logprobs(logits, token, rules).masked_fill(done, 0.0))
        done = done | torch.isin(token, eos)
        if stop_strings:
            done = done | _hit_stop_string(torch.stack(tokens, 1), done, tokenizer, stop_strings)
        if done.all() or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], 1)
        logits = state.step(model, token)
    out = torch.stack(tokens, 1)
    return GenerateOutput(out, torch.stack(logprobs, 1)) if return_logprobs else out


def _hit_stop_string(tokens: torch.Tensor, done: torch.Tensor, tokenizer, stop_strings: list[str]) -> torch.Tensor:
    hit = torch.zeros_like(done)
    for row in (~done).nonzero().flatten().tolist():
        text = tokenizer.decode(tokens[row].tolist())
        hit[row] = any(s in text for s in stop_strings)
    return hit
