"""PaliGemma's tokenizer: Gemma's SentencePiece model plus the image, location and segmentation tokens.

Reads a checkpoint directory in Hugging Face layout: `tokenizer.model` (SentencePiece, required) and
whatever `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json` and the
`added_tokens` list of `tokenizer.json` declare. It tokenizes exactly as transformers' GemmaTokenizer
(as set up by PaliGemmaProcessor) does:

- Every "atomic" token is split out of the text first and never merged with its neighbours: declared
  added tokens, SentencePiece control pieces (`<bos>`, `<eos>`, `<pad>`…) and the unknown piece. So
  `"<loc0001>"` or `"<eos>"` written in a prompt become one id, as in transformers.
- The text between them goes through SentencePiece unchanged: no dummy prefix space, no whitespace
  collapsing, byte fallback for characters outside the vocabulary (Gemma's normalizer settings; a
  tokenizer.model that normalizes differently is refused).
- `<image>`, `<loc0000>`…`<loc1023>`, `<seg000>`…`<seg127>` may be baked into the SentencePiece model
  (big_vision's PaliGemma tokenizer) or declared as added tokens (the Hub repos). Ids are always looked
  up by name; PaliGemma's real ids are `<loc i>` = 256000+i, `<seg i>` = 257024+i, `<image>` = 257152.
  Tokens declared nowhere are appended after the last id, `<image>` first, as PaliGemmaProcessor does.

Decoding follows SentencePiece for ordinary ids (a prefix of ids decodes like SentencePiece would,
with U+FFFD for each byte of an incomplete UTF-8 sequence) and writes atomic tokens as their text. This
equals transformers' decode except on invalid byte runs, where transformers turns *every* byte of the run
into U+FFFD (`<0xC3><0x0A>` gives "\ufffd\ufffd" there, "\ufffd\n" here).
`skip_special_tokens` drops bos/eos/pad/unk, `<image>`, control pieces and tokens declared special, but
never `<loc>`/`<seg>` tokens, which carry the model's answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from nanopali.errors import MissingFileError, TokenizerError, UsageError
from nanopali.json_files import read_json

IMAGE_TOKEN = "<image>"
NUM_LOC, NUM_SEG = 1024, 128
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(NUM_LOC))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(NUM_SEG))
_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")  # mask: only if a file declares it
_PROBE = " \u00e9\ufb01  x\n"  # accent, an NFKC-foldable ligature, a space run, a newline


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the text before SentencePiece runs (Hugging Face's AddedToken, minus options Gemma never uses)."""

    content: str
    id: int
    special: bool = False
    lstrip: bool = False  # swallow the whitespace on its left
    rstrip: bool = False  # swallow the whitespace on its right


class Tokenizer:
    """Gemma SentencePiece tokenizer with PaliGemma's extra tokens. See the module docstring for the rules."""

    def __init__(
        self,
        model: bytes | str | Path,
        added_tokens: Iterable[AddedToken] = (),
        special_tokens: dict[str, str] | None = None,
        extra_special_tokens: Iterable[str] = (),
        paligemma_tokens: bool = True,
    ):
        """`model`: the SentencePiece model (bytes or a path). `added_tokens`: tokens with declared ids.
        `special_tokens`: role -> text for bos_token/eos_token/pad_token/unk_token/mask_token (missing roles
        but mask are read from the model). `extra_special_tokens`: more tokens to treat as special (atomic, skipped in decode).
        `paligemma_tokens=False` leaves out `<image>`, `<loc>` and `<seg>` where the files do not declare them (plain
        Gemma text, e.g. SigLIP 2's text tower, whose embedding has rows only for the model's own ids)."""
        self._proto = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load_from_serialized_proto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
            raise TokenizerError(f"not a SentencePiece model ({e})") from None
        if self._sp.normalize(_PROBE) != _PROBE.replace(" ", "\u2581"):
            raise TokenizerError(
                "this tokenizer.model normalizes text (dummy prefix, whitespace collapsing or NFKC); Gemma's does not, "
                "and transformers' GemmaTokenizer would ignore it, so ids would silently differ. Use Gemma's tokenizer.model."
            )
        self.sp_vocab_size = self._sp.get_piece_size()
        self.vocab_size = self.sp_vocab_size  # number of real ids: grows with each added token past the model
        self._added: dict[str, AddedToken] = {}
        for tok in added_tokens:
            self._add(tok)
        names = dict(special_tokens or {})
        for role, sp_id in zip(_ROLES, (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id(), self._sp.unk_id())):
            if names.get(role) is None and sp_id >= 0:
                names[role] = self._sp.id_to_piece(sp_id)
        # Declared special tokens that exist nowhere are appended, then <image>, then <loc>/<seg> (transformers' order).
        for text in [names[r] for r in _ROLES if names.get(r) is not None] + list(extra_special_tokens):
            i = self._lookup(text)
            old = self._added.get(text, AddedToken(text, self.vocab_size if i is None else i))
            self._add(AddedToken(text, old.id, True, old.lstrip, old.rstrip))
        if paligemma_tokens and self._lookup(IMAGE_TOKEN) is None:
            self._add(AddedToken(IMAGE_TOKEN, self.vocab_size, special=True))
        for text in LOC_TOKENS + SEG_TOKENS if paligemma_tokens else ():
            if self._lookup(text) is None:
                self._add(AddedToken(text, self.vocab_size))
        self._check_contiguous()
        self.special_tokens = {role: names.get(role) for role in _ROLES}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.mask_id = (
            None if names.get(r) is None else self._lookup(names[r]) for r in _ROLES
        )
        self.image_token = IMAGE_TOKEN
        self.image_token_id = self._lookup(IMAGE_TOKEN)
        self._loc_ids = [i for i in map(self._lookup, LOC_TOKENS) if i is not None]
        self._seg_ids = [i for i in map(self._lookup, SEG_TOKENS) if i is not None]
        self._loc_value = {i: v for v, i in enumerate(self._loc_ids)}
        self._seg_value = {i: v for v, i in enumerate(self._seg_ids)}
        self._build_tables()

    # ------------------------------------------------------------------ construction helpers

    def _add(self, tok: AddedToken) -> None:
        old = self._added.get(tok.content)
        if old is not None and old.id != tok.id:
            raise TokenizerError(f"token {tok.content!r} is declared with two ids, {old.id} and {tok.id}")
        self._added[tok.content] = tok  # a second declaration with the same id replaces the first
        self.vocab_size = max(self.vocab_size, tok.id + 1)

    def _lookup(self, text: str) -> int | None:
        if text in self._added:
            return self._added[text].id
        sp_id = self._sp.piece_to_id(text)  # returns the unk id for an unknown piece, so check it round-trips
        return sp_id if self._sp.id_to_piece(sp_id) == text else None

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def sentencepiece(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePiece processor (ids below `sp_vocab_size`)."""
        return self._sp

    def _check_contiguous(self) -> None:
        by_id: dict[int, str] = {}
        for tok in self._added.values():
            if tok.id in by_id:
                raise TokenizerError(f"id {tok.id} is declared for two tokens, {by_id[tok.id]!r} and {tok.content!r}")
            by_id[tok.id] = tok.content
        missing = [i for i in range(self.sp_vocab_size, self.vocab_size) if i not in by_id]
        if missing:
            raise TokenizerError(
                f"added token ids must follow the {self.sp_vocab_size} SentencePiece pieces without gaps; "
                f"nothing is declared for ids {missing[:5]}{'…' if len(missing) > 5 else ''}"
            )

    def _build_tables(self) -> None:
        sp = self._sp
        control = [i for i in range(self.sp_vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
        # id -> text for every atomic id; the added table wins over the model (it may rename a piece).
        self._atomic_text: dict[int, str] = {i: sp.id_to_piece(i) for i in control}
        self._atomic_text.update({t.id: t.content for t in self._added.values()})
        self._atomic_id = {text: i for i, text in self._atomic_text.items()}
        self._strip = {t.content: (t.lstrip, t.rstrip) for t in self._added.values() if t.lstrip or t.rstrip}
        special = set(control) | {t.id for t in self._added.values() if t.special}
        special |= {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.image_token_id) if i is not None}
        self._special_ids = frozenset(special - set(self._loc_value) - set(self._seg_value))
        alternatives = sorted(self._atomic_id, key=len, reverse=True)  # longest first = leftmost-longest match
        self._split_re = re.compile("|".join(map(re.escape, alternatives)))

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with `<bos>` before and `<eos>` after."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        check_text(text)
        ids = [self._require(self.bos_id, "bos")] if add_bos else []
        pos, strip_next = 0, False
        for m in self._split_re.finditer(text):
            lstrip, rstrip = self._strip.get(m.group(), (False, False))
            chunk = text[pos:m.start()]
            chunk = chunk.lstrip() if strip_next else chunk
            ids += self._sp.encode(chunk.rstrip() if lstrip else chunk)
            ids.append(self._atomic_id[m.group()])
            pos, strip_next = m.end(), rstrip
        tail = text[pos:]
        ids += self._sp.encode(tail.lstrip() if strip_next else tail)
        if add_eos:
            ids.append(self._require(self.eos_id, "eos"))
        return ids

    def batch_encode(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("batch_encode takes a list of str; use encode for a single string")
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, a 1-D tensor or array). Special tokens are dropped or written as their text."""
        ids = self._as_id_list(ids)
        out, run = [], []
        for i in ids:
            if skip_special_tokens and i in self._special_ids:
                continue  # dropped without breaking the run, so bytes around it still join (as transformers)
            text = self._atomic_text.get(i)
            if text is None:
                run.append(i)
            else:
                out += [self._sp.decode(run), text]
                run = []
        out.append(self._sp.decode(run))
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def _as_id_list(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"decode takes a flat sequence of int ids, got a {type(i).__name__}; use batch_decode for several sequences")
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
        return [int(i) for i in ids]

    # ------------------------------------------------------------------ ids and tokens

    def token_to_id(self, token: str) -> int:
        i = self._lookup(token)
        if i is None:
            raise KeyError(f"{token!r} is not a token of this tokenizer")
        return i

    def id_to_token(self, i: int) -> str:
        (i,) = self._as_id_list([i])
        return self._atomic_text.get(i) or self._sp.id_to_piece(i)

    def is_special(self, i: int) -> bool:
        """True for ids that `decode(..., skip_special_tokens=True)` drops."""
        return i in self._special_ids

    def loc_id(self, i: int) -> int:
        """Id of `<loc{i:04d}>`, 0 <= i < 1024."""
        if not 0 <= i < NUM_LOC:
            raise ValueError(f"location index {i} is outside 0..{NUM_LOC - 1}")
        if len(self._loc_ids) != NUM_LOC:
            raise TokenizerError("this tokenizer has no <loc> tokens (a plain Gemma text tokenizer)")
        return self._loc_ids[i]

    def seg_id(self, i: int) -> int:
        """Id of `<seg{i:03d}>`, 0 <= i < 128."""
        if not 0 <= i < NUM_SEG:
            raise ValueError(f"segmentation index {i} is outside 0..{NUM_SEG - 1}")
        if len(self._seg_ids) != NUM_SEG:
            raise TokenizerError("this tokenizer has no <seg> tokens (a plain Gemma text tokenizer)")
        return self._seg_ids[i]

    def is_loc(self, i: int) -> bool:
        return i in self._loc_value

    def is_seg(self, i: int) -> bool:
        return i in self._seg_value

    def loc_value(self, i: int) -> int:
        """N of the id of `<locNNNN>`."""
        return _value(self._loc_value, i, "<locNNNN>")

    def seg_value(self, i: int) -> int:
        """N of the id of `<segNNN>`."""
        return _value(self._seg_value, i, "<segNNN>")

    @staticmethod
    def _require(i: int | None, name: str) -> int:
        if i is None:
            raise TokenizerError(f"this tokenizer has no {name} token; declare {name}_token in tokenizer_config.json")
        return i

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(cls, path: str | Path, paligemma_tokens: bool = True) -> "Tokenizer":
        """Read `tokenizer.model` and the JSON files next to it from a directory (or a tokenizer.model path)."""
        path = Path(path)
        folder, model = (path, path / "tokenizer.model") if path.is_dir() else (path.parent, path)
        if not model.is_file():
            hint = " (there is a tokenizer.json, but nanopali needs the SentencePiece model)" if (folder / "tokenizer.json").is_file() else ""
            raise MissingFileError(f"no tokenizer.model in {folder}{hint}")
        added, names, extra = _read_declarations(folder)
        return cls(model, added_tokens=added, special_tokens=names, extra_special_tokens=extra,
                   paligemma_tokens=paligemma_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json and added_tokens.json (HF layout)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.model").write_bytes(self._proto)
        decoder = {
            str(i): {"content": text, "lstrip": self._strip.get(text, (False, False))[0], "normalized": False,
                     "rstrip": self._strip.get(text, (False, False))[1], "single_word": False, "special": i in self._special_ids}
            for i, text in sorted(self._atomic_text.items())
        }
        names = {role: text for role, text in self.special_tokens.items() if text is not None}
        config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, **names,
                  "added_tokens_decoder": decoder}
        _write_json(path / "tokenizer_config.json", config)
        _write_json(path / "special_tokens_map.json", names)
        extra = {t.content: t.id for t in sorted(self._added.values(), key=lambda t: t.id) if t.id >= self.sp_vocab_size}
        if extra:
            _write_json(path / "added_tokens.json", extra)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, sentencepiece={self.sp_vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, image={self.image_token_id})")


def check_text(text: str, what: str = "the text") -> None:
    """UsageError for a str that is not valid Unicode text: a lone surrogate (U+D800..U+DFFF), which is what an
    undecodable byte becomes in sys.argv or in a file read with errors="surrogateescape". SentencePiece cannot
    encode one (its error would be "Unable to cast Python instance")."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        found = (f"the undecodable byte 0x{code - 0xDC00:02x} (not UTF-8: Latin-1 or binary data?)" if 0xDC80 <= code <= 0xDCFF
                 else f"a lone surrogate {text[e.start]!r} (not valid Unicode text)")
        raise UsageError(f"{what} contains {found} at character {e.start}; give it as UTF-8 text") from None


def _value(table: dict[int, int], i: int, what: str) -> int:
    if i not in table:
        raise ValueError(f"token id {i} is not a {what} token")
    return table[i]


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_read_json = partial(read_json, error=TokenizerError)  # a broken tokenizer file is a TokenizerError


def _token_text(value) -> str | None:
    """A special token as the files write it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_declarations(folder: Path) -> tuple[list[AddedToken], dict[str, str], list[str]]:
    """Added tokens (with ids), role names and extra special tokens declared by a HF tokenizer directory."""
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    fast = _read_json(folder / "tokenizer.json")
    added: dict[str, AddedToken] = {}

    def declare(source: str, i, entry: dict) -> None:
        content = entry.get("content")
        if not isinstance(content, str) or not isinstance(i, int) or i < 0:
            raise TokenizerError(f"{folder}/{source}: bad added token entry {content!r} -> {i!r}")
        old = added.get(content, AddedToken(content, i))
        if old.id != i:
            raise TokenizerError(f"{folder}/{source}: token {content!r} has id {i}, but another file gives it id {old.id}")
        flags = [bool(getattr(old, k) or entry.get(k)) for k in ("special", "lstrip", "rstrip")]
        added[content] = AddedToken(content, i, *flags)

    for entry in fast.get("added_tokens", []):
        declare("tokenizer.json", entry.get("id"), entry)
    for key, entry in config.get("added_tokens_decoder", {}).items():
        declare("tokenizer_config.json", int(key) if str(key).isdigit() else key, entry if isinstance(entry, dict) else {"content": entry})
    for content, i in _read_json(folder / "added_tokens.json").items():
        declare("added_tokens.json", i, {"content": content})
    names = {}
    for role in _ROLES:
        value = _token_text(config.get(role)) or _token_text(special_map.get(role))
        if value is not None:
            names[role] = value
    extra = []
    for source in (config, special_map):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            values = source.get(key) or []
            values = values.values() if isinstance(values, dict) else values
            extra += [t for t in map(_token_text, values) if isinstance(t, str) and t not in extra]
    return list(added.values()), names, extra
