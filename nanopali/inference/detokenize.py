"""Decoding tokens to text as they arrive: pieces whose concatenation is the final decoded string.

SentencePiece decoding is not piecewise: a piece's leading "▁" becomes a space only after the
first word, and byte-fallback tokens (<0xE2><0x82><0xAC> = "€") only form a character together.
So the decoder re-decodes all tokens so far and emits what the text grew by, holding back a
trailing U+FFFD (an unfinished multi-byte character) until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Callable


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
