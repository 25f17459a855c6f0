"""Streaming: the answer to one prompt as decoded text pieces while the tokens are generated
(answers.AnswerText), whose concatenation is the final decoded string."""

from __future__ import annotations

from collections.abc import Iterator

from nanopali.inference.answers import AnswerText, model_inputs
from nanopali.inference.generate import generate_tokens, tokenizer_settings
from nanopali.inference.runtime import Runtime
from nanopali.models.paligemma import PaliGemma


def stream(model: PaliGemma, processor, image, prompt: str, runtime: Runtime | None = None, **generate_kwargs) -> Iterator[str]:
    """Yield the answer to `prompt` about `image` piece by piece (greedy unless sampling is asked for).

    `processor` is a nanopali Processor; generate_kwargs are those of `generate_tokens` (num_beams > 1 is a
    UsageError: beams cannot stream). The prompt, the image and the options are checked when this is
    called, before the first piece is asked for.
    """
    batch = model_inputs(model, processor, [image], [prompt])
    tokenizer = processor.tokenizer
    generate_kwargs = {**tokenizer_settings(tokenizer), **generate_kwargs}
    if generate_kwargs.get("stop_strings"):
        generate_kwargs.setdefault("tokenizer", tokenizer)
    tokens = generate_tokens(model, **batch, runtime=runtime, **generate_kwargs)
    return _pieces(tokens, tokenizer)


def _pieces(tokens, tokenizer) -> Iterator[str]:
    text = AnswerText(tokenizer)
    for token, _ in tokens:
        t = int(token[0])
        if t == tokenizer.eos_id:
            break
        piece = text.push(t)
        if piece:
            yield piece
    rest, _ = text.finish()
    if rest:
        yield rest
