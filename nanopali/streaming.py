"""Streaming: decoded text pieces as tokens arrive, whose concatenation is the final decoded string.

SentencePiece decoding is not piecewise: a piece's leading "▁" becomes a space only after the
first word, and byte-fallback tokens (<0xE2><0x82><0xAC> = "€") only form a character together.
So the decoder re-decodes all tokens so far and emits what the text grew by, holding back a
trailing U+FFFD (an unfinished multi-byte character) until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .generate import generate_tokens, tokenizer_settings


class IncrementalDecoder:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        """Add one token; return the new text it completes (possibly "")."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def finish(self) -> str:
        """The rest of the text (an unfinished character is emitted as decoded)."""
        return self._advance(self.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):  # the decoder rewrote earlier text: emit nothing until the end
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def stream(model, processor, image, prompt: str, **generate_kwargs) -> Iterator[str]:
    """Yield the answer to `prompt` about `image` piece by piece (greedy unless sampling is asked for).

    `processor` is a nanopali Processor; generate_kwargs are those of `generate_tokens`.
    """
    if generate_kwargs.get("num_beams", 1) > 1:
        raise ValueError("beam search cannot stream: the best beam is only known at the end")
    generate_kwargs.pop("num_beams", None)
    batch = {k: v.to(model.device) for k, v in processor(images=[image], prompts=[prompt]).items()}
    tokenizer = processor.tokenizer
    eos = {tokenizer.eos_id}
    decoder = IncrementalDecoder(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    generate_kwargs = {**tokenizer_settings(tokenizer), **generate_kwargs}
    if generate_kwargs.get("stop_strings"):
        generate_kwargs.setdefault("tokenizer", tokenizer)
    for token, _ in generate_tokens(model, **{k: v for k, v in batch.items() if k != "labels"}, **generate_kwargs):
        t = int(token[0])
        if t in eos:
            break
        piece = decoder.push(t)
        if piece:
            yield piece
    rest = decoder.finish()
    if rest:
        yield rest
