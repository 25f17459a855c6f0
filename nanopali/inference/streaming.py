"""Streaming: the answer to one prompt as decoded text pieces while the tokens are generated
(detokenize.IncrementalDecoder), whose concatenation is the final decoded string."""

from __future__ import annotations

from collections.abc import Iterator

from nanopali.inference.answers import model_inputs
from nanopali.inference.detokenize import IncrementalDecoder
from nanopali.inference.generate import generate_tokens, tokenizer_settings
from nanopali.inference.runtime import Runtime
from nanopali.models.paligemma import PaliGemma


def stream(model: PaliGemma, processor, image, prompt: str, runtime: Runtime | None = None, **generate_kwargs) -> Iterator[str]:
    """Yield the answer to `prompt` about `image` piece by piece (greedy unless sampling is asked for).

    `processor` is a nanopali Processor; generate_kwargs are those of `generate_tokens`.
    """
    if generate_kwargs.get("num_beams", 1) > 1:
        raise ValueError("beam search cannot stream: the best beam is only known at the end")
    generate_kwargs.pop("num_beams", None)
    batch = model_inputs(model, processor, [image], [prompt])
    tokenizer = processor.tokenizer
    eos = {tokenizer.eos_id}
    decoder = IncrementalDecoder(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    generate_kwargs = {**tokenizer_settings(tokenizer), **generate_kwargs}
    if generate_kwargs.get("stop_strings"):
        generate_kwargs.setdefault("tokenizer", tokenizer)
    for token, _ in generate_tokens(model, **batch, runtime=runtime, **generate_kwargs):
        t = int(token[0])
        if t in eos:
            break
        piece = decoder.push(t)
        if piece:
            yield piece
    rest = decoder.finish()
    if rest:
        yield rest
