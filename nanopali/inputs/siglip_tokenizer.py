"""SigLIP's text tokenizers: text -> the fixed-length ids the text tower was trained on.

Two kinds of checkpoint, told apart by their files (never by name):

- SigLIP (`spiece.model`, T5-style SentencePiece, transformers' `SiglipTokenizer`): the text is canonicalized
  first, as big_vision's SigLIP preprocessing did: lower-cased (`do_lower_case`), ASCII punctuation removed,
  whitespace runs collapsed to one space, stripped. Special tokens written in the text (`</s>`, `<unk>`, and
  declared extra ones) are split out first and swallow the whitespace around them. Each piece between them is
  encoded as SentencePiece encodes `"<unk>" + piece` with the `<unk>` pieces removed (transformers' way of keeping
  the word-start marker of the first word), the whole text starting with that marker; `</s>` follows.
- SigLIP 2 (`tokenizer.model`, Gemma's SentencePiece): the PaliGemma tokenizer's rules (inputs/tokenizer.py)
  without PaliGemma's extra tokens, `<bos>`/`<eos>` only as tokenizer_config.json's add_bos_token / add_eos_token
  say (transformers 5 adds neither when they are not written), lower-cased first when the config says so
  (`Siglip2Tokenizer`, whose normalizer lower-cases, or do_lower_case).

Both are cut to `max_length` keeping their closing token (transformers' truncation=True; big_vision's "sticky"
eos) and padded to exactly `max_length` with the pad id, on the side tokenizer_config.json names (transformers'
class default otherwise: right for SigLIP, left for Gemma). SigLIP pools the last position, so the length and side
matter: they are what the model was trained with.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import sentencepiece as spm

from nanopali.errors import MissingFileError, TokenizerError
from nanopali.inputs.tokenizer import Tokenizer, check_text
from nanopali.json_files import read_json

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORD_START = "\u2581"  # SentencePiece's "▁"


class SiglipTokenizer:
    """transformers' SiglipTokenizer: canonicalized text, T5-style SentencePiece, `</s>` at the end."""

    padding_side = "right"
    ends_with_eos = True  # encode() closes every text with </s>, which truncation keeps

    def __init__(self, model: bytes | str | Path, eos_token: str = "</s>", unk_token: str = "<unk>",
                 pad_token: str = "</s>", extra_special_tokens=(), do_lower_case: bool = True):
        proto = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load_from_serialized_proto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
            raise TokenizerError(f"not a SentencePiece model ({e})") from None
        self._proto, self.do_lower_case = proto, do_lower_case
        self.unk_token = unk_token
        self.vocab_size = self._sp.get_piece_size()
        specials = [eos_token, unk_token, pad_token, *extra_special_tokens]
        self._special = {t: self._piece_id(t) for t in specials}
        self.eos_id, self.pad_id = self._special[eos_token], self._special[pad_token]
        self._split = re.compile("|".join(map(re.escape, sorted(self._special, key=len, reverse=True))))
        self._unk_pieces = len(self._sp.encode(unk_token))
        start = self._sp.piece_to_id(_WORD_START)
        self._word_start = start if self._sp.id_to_piece(start) == _WORD_START else None

    def _piece_id(self, text: str) -> int:
        i = self._sp.piece_to_id(text)
        if self._sp.id_to_piece(i) != text:
            raise TokenizerError(f"the SentencePiece model has no piece {text!r}, which tokenizer_config.json names as a "
                                 "special token")
        return i

    def canonicalize(self, text: str) -> str:
        """Lower-case (with do_lower_case), remove ASCII punctuation, collapse whitespace, strip."""
        text = text.lower() if self.do_lower_case else text
        return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()

    def encode(self, text: str) -> list[int]:
        """Ids of `text` followed by `</s>` (not repeated when the text already ends with it)."""
        check_text(text)
        chunks, ids, strip_next = [], [], False
        text = _WORD_START + text.replace(_WORD_START, " ")
        pos = 0
        for m in self._split.finditer(text):  # special tokens are atomic and swallow the whitespace around them
            chunks.append(text[pos:m.start()].rstrip())
            chunks.append(m.group())
            pos = m.end()
        chunks.append(text[pos:])
        for i, chunk in enumerate(chunks):
            if i % 2:          # a special token
                ids.append(self._special[chunk])
                continue
            chunk = chunk.lstrip() if i else chunk
            if chunk:
                pieces = self._sp.encode(self.unk_token + self.canonicalize(chunk))
                pieces = pieces[self._unk_pieces:] if len(pieces) >= self._unk_pieces else pieces
                if i == 0 and len(chunks) > 1 and pieces == [self._word_start]:
                    pieces = []  # a bare word-start marker before a leading special token (transformers drops it)
                ids += pieces
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special.values()])

    def save_pretrained(self, path: str | Path) -> None:
        import json
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "spiece.model").write_bytes(self._proto)
        names = {v: k for k, v in self._special.items()}
        config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": 64, "do_lower_case": self.do_lower_case,
                  "eos_token": names[self.eos_id], "pad_token": names[self.pad_id], "unk_token": self.unk_token}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


class GemmaTextTokenizer:
    """SigLIP 2's text tokenizer: Gemma's SentencePiece (inputs/tokenizer.py) with optional bos/eos and lower-casing."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool = False, add_eos: bool = False, lower: bool = False,
                 padding_side: str = "left"):
        self.tokenizer, self.add_bos, self.add_eos, self.lower = tokenizer, add_bos, add_eos, lower
        self.padding_side = padding_side
        self.ends_with_eos = add_eos
        self.vocab_size, self.pad_id, self.eos_id = tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id
        if self.pad_id is None:
            raise TokenizerError("the tokenizer has no pad token, which fixed-length SigLIP texts need; declare "
                                 "pad_token in tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.lower() if self.lower else text, add_bos=self.add_bos, add_eos=self.add_eos)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def save_pretrained(self, path: str | Path) -> None:
        import json
        self.tokenizer.save_pretrained(path)
        file = Path(path) / "tokenizer_config.json"
        config = json.loads(file.read_text(encoding="utf-8"))
        config.update(add_bos_token=self.add_bos, add_eos_token=self.add_eos, padding_side=self.padding_side,
                      tokenizer_class="Siglip2Tokenizer" if self.lower else "GemmaTokenizer")
        file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def text_tokenizer(folder: str | Path) -> SiglipTokenizer | GemmaTextTokenizer:
    """The text tokenizer of a SigLIP checkpoint directory: `spiece.model` (SigLIP) or `tokenizer.model` (SigLIP 2)."""
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json", TokenizerError)
    side = config.get("padding_side")
    if side not in (None, "left", "right"):
        raise TokenizerError(f"{folder}/tokenizer_config.json: padding_side must be 'left' or 'right', got {side!r}")
    if (folder / "spiece.model").is_file():
        names = {k: _text(config.get(k), default) for k, default in
                 (("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "</s>"))}
        extra = [t for t in map(_text, config.get("additional_special_tokens") or []) if t]
        tok = SiglipTokenizer(folder / "spiece.model", **names, extra_special_tokens=extra,
                              do_lower_case=bool(config.get("do_lower_case", True)))
        tok.padding_side = side or "right"
        return tok
    if (folder / "tokenizer.model").is_file():
        lower = config.get("tokenizer_class") == "Siglip2Tokenizer" or bool(config.get("do_lower_case", False))
        return GemmaTextTokenizer(Tokenizer.from_pretrained(folder, paligemma_tokens=False),
                                  add_bos=bool(config.get("add_bos_token", False)),
                                  add_eos=bool(config.get("add_eos_token", False)), lower=lower,
                                  padding_side=side or "left")
    hint = " (there is a tokenizer.json, but nanopali needs the SentencePiece model)" if (folder / "tokenizer.json").is_file() else ""
    raise MissingFileError(f"no spiece.model (SigLIP) or tokenizer.model (SigLIP 2) in {folder}{hint}")


def _text(value, default: str | None = None) -> str | None:
    """A special token as tokenizer files write it: a string or an AddedToken dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else default
