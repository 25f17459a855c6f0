"""Generation strategies on top of decode.py: greedy, sampling (temperature / top-k / top-p) and beams.

    generate(model, **processor_batch, max_new_tokens=32, ...)  -> new tokens (B, N)

Each row stops at <eos> or a stop string on its own; finished rows are filled with the pad id.
Every option is checked once, before any work, by GenerationOptions (options.py), and the inputs by
PaliGemma.check_inputs (ids in the vocabulary, finite pixels): a bad one is a UsageError naming it.
This module only uses the model's pieces (embed, decoder). Task logic (boxes, masks) never enters this loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nanopali.errors import UsageError
from nanopali.inference.beam import beam_search
from nanopali.inference.decode import prefill
from nanopali.inference.options import GenerationOptions, generation_options
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


def logit_rules(model: PaliGemma, device, options: GenerationOptions) -> tuple[LogitRules, int]:
    """The LogitRules and pad id of one call (or of every row of a batch.RowBatch); vocab_limit None = every
    embedding row is a token."""
    text = model.config.text_config
    options.check_vocabulary(text.vocab_size)
    eos = [text.eos_token_id] if options.eos_token_id is None else list(options.eos_token_id)
    image = model.config.image_token_index
    rules = LogitRules(vocab_limit=options.vocab_limit or text.vocab_size, eos=torch.tensor(eos, dtype=torch.long, device=device),
                       banned=(image,) if image < text.vocab_size else (), repetition_penalty=options.repetition_penalty)
    return rules, text.pad_token_id if options.pad_token_id is None else options.pad_token_id


def generate_tokens(
    model: PaliGemma,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    *,
    tokenizer=None,
    with_logprobs: bool = False,
    runtime: Runtime | None = None,
    **options,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (token (B,), logprob (B,) or None) once per step: the streaming form of `generate`.

    A row's tokens after its <eos> (or stop string) are the pad id with log-probability 0; the
    iteration ends when every row is done or after max_new_tokens. The options and the inputs are
    checked when this is called, before the first token is asked for (a UsageError names a bad one).

    options: those of `GenerationOptions` (inference/options.py), all checked there:
    max_new_tokens (32) / min_new_tokens (0): bounds on the number of new tokens per row.
    do_sample, temperature, top_k, top_p, generator: sampling. Greedy when do_sample=False or temperature=0;
    greedy decoding ignores top_k / top_p / generator (as transformers), but their values are still checked.
    repetition_penalty: transformers' CTRL-style penalty over the prompt and the generated tokens.
    eos_token_id (int or list), pad_token_id: default to the config's.
    vocab_limit: ids >= this are never produced (default: none; `tokenizer_settings` gives the tokenizer's size);
    `<image>` never is.
    stop_strings + tokenizer: a row also stops once its decoded text contains one of the strings.
    num_beams must be 1 here: beam search cannot stream (use `generate`).
    runtime: how the model runs (inference/runtime.py: `prepare`'s result); default Runtime().
    """
    opts = generation_options("generate_tokens", options)
    if opts.num_beams > 1:
        raise UsageError(f"beam search cannot stream: the best beam is only known at the end; got num_beams={opts.num_beams}, "
                         "use generate() for beams or num_beams=1 to stream")
    rules, pad = _prepare(model, input_ids, pixel_values, opts, tokenizer)
    return _steps(model, input_ids, pixel_values, attention_mask, token_type_ids, opts, rules, pad, tokenizer,
                  with_logprobs, runtime)


def _prepare(model: PaliGemma, input_ids, pixel_values, opts: GenerationOptions, tokenizer) -> tuple[LogitRules, int]:
    """Everything checked before the prefill: the options against the model, and the inputs."""
    if opts.stop_strings and tokenizer is None:
        raise UsageError("stop_strings needs the tokenizer to decode the generated text")
    if opts.generator is not None and opts.generator.device.type != input_ids.device.type:
        raise UsageError(f"the generator is on {opts.generator.device} but the inputs are on {input_ids.device}; "
                         f"make it with torch.Generator(device={str(input_ids.device)!r})")
    rules, pad = logit_rules(model, input_ids.device, opts)
    model.check_inputs(input_ids, pixel_values)
    return rules, pad


def next_token(logits: torch.Tensor, rules: LogitRules, opts: GenerationOptions, *, ban_eos: bool = False,
               seen: torch.Tensor | None = None, with_logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every row's next token from its logits (B, V) under one set of options: the logit rules (and <eos> banned
    while `ban_eos`), then greedy or sampled. Returns (token (B,), its log-probability under the model (B,) or None).
    The one picking step of `generate`, streaming and the continuous batch (batching.py)."""
    scores = constrain(logits, rules, seen=seen, ban_eos=ban_eos)
    token = pick_token(scores, do_sample=opts.do_sample, temperature=opts.temperature, top_k=opts.top_k,
                       top_p=opts.top_p, generator=opts.generator)
    return token, model_logprobs(logits, rules).gather(1, token[:, None])[:, 0] if with_logprobs else None


@torch.no_grad()
def _steps(model, input_ids, pixel_values, attention_mask, token_type_ids, opts: GenerationOptions, rules: LogitRules,
           pad: int, tokenizer, with_logprobs: bool, runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    max_new_tokens = opts.max_new_tokens
    logits, state = prefill(model, input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens,
                            runtime=runtime)
    seen = input_ids if opts.repetition_penalty != 1.0 else None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    so_far = []
    for step in range(max_new_tokens):
        token, logprob = next_token(logits, rules, opts, ban_eos=step < opts.min_new_tokens, seen=seen,
                                    with_logprobs=with_logprobs)
        token = token.masked_fill(done, pad)
        logprob = logprob.masked_fill(done, 0.0) if with_logprobs else None
        yield token, logprob
        done = done | torch.isin(token, rules.eos)
        if opts.stop_strings:
            so_far.append(token)
            done = done | _hit_stop_string(torch.stack(so_far, 1), done, tokenizer, list(opts.stop_strings))
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
    return_logprobs: bool = False,
    labels: torch.Tensor | None = None,
    tokenizer=None,
    runtime: Runtime | None = None,
    **options,
) -> torch.Tensor | GenerateOutput:
    """Generate up to max_new_tokens per row. Returns the new tokens (B, N), N <= max_new_tokens.

    Each row stops on its own; finished rows are filled with the pad id. num_beams > 1 runs beam
    search (with length_penalty; sampling options and stop strings are refused there). return_logprobs=True
    returns GenerateOutput(tokens, logprobs), the model's log-probability of each token over the real
    vocabulary. `labels` (from a processor call with suffixes) is accepted and ignored. options are
    `GenerationOptions`' (see `generate_tokens`), all checked before any work, as are the inputs: token
    ids outside the vocabulary or non-finite pixel_values are a UsageError.
    """
    opts = generation_options("generate", options)
    rules, pad = _prepare(model, input_ids, pixel_values, opts, tokenizer)
    if opts.num_beams > 1:
        tokens, logprobs = beam_search(
            model, input_ids, pixel_values, attention_mask, token_type_ids, num_beams=opts.num_beams,
            length_penalty=opts.length_penalty, pad=pad, rules=rules, max_new_tokens=opts.max_new_tokens,
            min_new_tokens=opts.min_new_tokens, runtime=runtime)
        return GenerateOutput(tokens, logprobs) if return_logprobs else tokens
    steps = list(_steps(model, input_ids, pixel_values, attention_mask, token_type_ids, opts, rules, pad, tokenizer,
                        return_logprobs, runtime))
    tokens = torch.stack([t for t, _ in steps], 1)
    return GenerateOutput(tokens, torch.stack([lp for _, lp in steps], 1)) if return_logprobs else tokens


def _hit_stop_string(tokens: torch.Tensor, done: torch.Tensor, tokenizer, stop_strings: list[str]) -> torch.Tensor:
    hit = torch.zeros_like(done)
    for row in (~done).nonzero().flatten().tolist():
        text = tokenizer.decode(tokens[row].tolist())
        hit[row] = any(s in text for s in stop_strings)
    return hit
