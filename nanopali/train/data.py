"""Training data: JSONL files (one example a line) or any Python sequence/iterable of examples.

    {"image": "relative/or/absolute/path.jpg", "prefix": "detect cat", "suffix": "<loc0123>… cat"}   PaliGemma (Example)
    {"image": "relative/or/absolute/path.jpg", "text": "a red circle above a blue square"}         SigLIP (Pair)

Image paths are relative to the JSONL file. Every line is checked fully when the file is opened, so that
nothing fails later at the batch that draws it: UTF-8 text, valid JSON, an object with the three string
fields, an image file that exists and decodes completely (load_image: a JPEG truncated inside its data
is caught, not only a bad header); and, given the processor, a prefix and suffix that tokenize, hold no
`<image>` (the processor puts the image tokens in front of the prefix itself) and, with max_length, fit in
it; for a Pair, a text that tokenizes (a text longer than the text tower's fixed length is cut when batched, and
counted in `truncated`). Fields beyond a Pair's two are kept in `extra` (e.g. a "label" for held-out zero-shot
accuracy). A bad line is a DataError naming file:line and the reason; with `skip_bad=True` it is skipped and
counted instead (`skipped`: the messages; `skipped_reasons`: how many per reason), and the trainer
reports both. A binary file is refused as a whole. Examples passed as Python objects are not checked
ahead: a bad one is a DataError naming it when its batch is made.

The order of examples is a pure function of (seed, position): example k of the stream is entry
`permutation(seed + epoch)[k % N]`, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanopali.errors import DataError, ImageError, ImageNotFoundError, MissingFileError
from nanopali.inputs.images import DEFAULT_MAX_PIXELS, load_image

FIELDS = ("image", "prefix", "suffix")
PAIR_FIELDS = ("image", "text")


@dataclass
class Example:
    image: object   # a path, PIL image, array … anything the Processor accepts
    prefix: str
    suffix: str
    source: str = ""  # "file.jsonl:12", for error messages
    extra: dict = field(default_factory=dict)  # further fields of a dict item, e.g. labels for an auxiliary loss


@dataclass
class Pair:
    image: object   # a path, PIL image, array … anything the SigLIPProcessor accepts
    text: str
    source: str = ""
    extra: dict = field(default_factory=dict)  # further fields, e.g. "label" for zero-shot accuracy


class _BadLine(DataError):
    """A DataError with the short reason it is counted under when skipped."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.reason = reason


class JsonlDataset(Sequence):
    """The examples of a JSONL file, every line checked when it is opened (see the module's docstring).

    `processor` (the model's Processor) enables the text checks; `max_length` the length check. `fields` is FIELDS
    (Examples, PaliGemma) or PAIR_FIELDS (Pairs, SigLIP). `sha256` is the file's digest (a resumed run refuses a
    changed file)."""

    def __init__(self, path: str | Path, skip_bad: bool = False, processor=None, max_length: int | None = None,
                 fields: tuple[str, ...] = FIELDS):
        self.path = Path(path)
        self.processor, self.max_length, self.fields = processor, max_length, fields
        self.truncated = 0  # Pairs whose text is longer than the text tower's length
        if self.path.is_dir():
            raise DataError(f"training data {self.path} is a directory, not a JSONL file")
        if not self.path.is_file():
            raise MissingFileError(f"training data {self.path} does not exist")
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read training data {self.path} ({e.strerror})") from None
        if b"\0" in raw[:65536]:
            raise DataError(f"{self.path} is a binary file, not JSONL text (one JSON object per line)")
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.examples: list[Example] = []
        self.skipped: list[str] = []
        self.skipped_reasons: Counter[str] = Counter()
        for number, line in enumerate(raw.splitlines(), start=1):  # \n, \r\n, \r: not U+2028 inside a string
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            try:
                self.examples.append(self._parse(line, f"{self.path}:{number}"))
            except _BadLine as e:
                if not skip_bad:
                    raise DataError(str(e)) from None
                self.skipped.append(str(e))
                self.skipped_reasons[e.reason] += 1
        if not self.examples:
            raise DataError(f"{self.path} holds no usable example" + (f" ({self.skip_summary()})" if self.skipped else ""))

    def skip_summary(self) -> str:
        """'3 bad lines skipped: 2 image cannot be read, 1 <image> in suffix' ('' when none was skipped)."""
        if not self.skipped:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped_reasons.most_common())
        return f"{len(self.skipped)} bad line{'s' if len(self.skipped) > 1 else ''} skipped: {reasons}"

    def _parse(self, line: bytes, where: str) -> Example:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadLine(where, "not UTF-8", f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                               "save the file as UTF-8") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise _BadLine(where, "not valid JSON", f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise _BadLine(where, "not a JSON object", f"expected a JSON object with fields {self.fields}, "
                                                       f"got {type(record).__name__}")
        missing = [f for f in self.fields if not isinstance(record.get(f), str)]
        if missing:
            raise _BadLine(where, "missing fields", f"missing or non-string field(s) {missing}")
        image = Path(record["image"])
        image = image if image.is_absolute() else self.path.parent / image
        if not image.is_file():
            raise _BadLine(where, "image does not exist", f"image {image} does not exist")
        max_pixels = self.processor.max_pixels if self.processor is not None else DEFAULT_MAX_PIXELS
        try:
            load_image(image, max_pixels=max_pixels).close()  # decodes every pixel: truncated data fails here
        except (ImageError, ImageNotFoundError) as e:
            detail = str(e).removeprefix(f"{image}: ")
            raise _BadLine(where, "image cannot be read", f"image {image} cannot be read ({detail})") from None
        if self.fields == PAIR_FIELDS:
            if self.processor is not None:
                self._check_pair_text(record["text"], where)
            return Pair(image, record["text"], where, {k: v for k, v in record.items() if k not in PAIR_FIELDS})
        if self.processor is not None:
            self._check_text(record["prefix"], record["suffix"], where)
        return Example(image, record["prefix"], record["suffix"], where)

    def _check_pair_text(self, text: str, where: str) -> None:
        """The text is valid text and tokenizes; one longer than the text tower's length is counted (it is cut)."""
        try:
            ids = self.processor.tokenizer.encode(text)
        except (RuntimeError, ValueError, TypeError) as e:
            raise _BadLine(where, "text cannot be tokenized", f"cannot tokenize the text ({e})") from None
        self.truncated += len(ids) > self.processor.max_length

    def _check_text(self, prefix: str, suffix: str, where: str) -> None:
        """The prefix and suffix tokenize, hold no <image>, and fit in max_length with the image tokens."""
        tok = self.processor.tokenizer
        for name, text in (("prefix", prefix), ("suffix", suffix)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _BadLine(where, f"invalid text in {name}", f"the {name} holds a lone surrogate "
                                                                 f"{text[e.start]!r} at character {e.start}, not text") from None
            if tok.image_token in text:
                raise _BadLine(where, f"{tok.image_token} in {name}",
                               f"the {name} contains {tok.image_token}; the processor puts the image tokens before the "
                               "prefix itself, remove it")
        try:
            prefix_ids = self.processor.prefix_ids(prefix, 1)
            suffix_ids = tok.encode(suffix) + [tok.eos_id]
        except (RuntimeError, ValueError, TypeError) as e:
            raise _BadLine(where, "text cannot be tokenized", f"cannot tokenize the prefix or suffix ({e})") from None
        n = len(prefix_ids) + len(suffix_ids)
        if self.max_length is not None and n > self.max_length:
            images = self.processor.num_image_tokens
            raise _BadLine(where, "longer than max_length",
                           f"takes {n} tokens ({images} image tokens, {len(prefix_ids) - images} for <bos>, the prefix "
                           f"and \\n, {len(suffix_ids)} for the suffix and <eos>), more than max_length={self.max_length}; "
                           "raise --max-length or shorten the example")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def as_example(item, where: str, fields: tuple[str, ...] = FIELDS) -> Example | Pair:
    """An Example (fields FIELDS) or a Pair (PAIR_FIELDS) from itself or a dict with those fields (others: extra)."""
    kind = Pair if fields == PAIR_FIELDS else Example
    if isinstance(item, kind):
        return item
    if isinstance(item, dict) and all(f in item for f in fields):
        return kind(*(item[f] for f in fields), where, {k: v for k, v in item.items() if k not in fields})
    raise DataError(f"{where}: expected {'a Pair' if kind is Pair else 'an Example'} or a dict with fields {fields}, "
                    f"got {type(item).__name__}")


def example_stream(data: Sequence | Iterable, seed: int, start: int = 0,
                   fields: tuple[str, ...] = FIELDS) -> Iterator[Example | Pair]:
    """Examples from position `start` on: shuffled epochs for a sequence, in order for an iterable."""
    if isinstance(data, Sequence):
        n = len(data)
        if n == 0:
            raise DataError("the training data holds no example")
        position = start
        while True:
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            for i in order[offset:]:
                yield as_example(data[i], f"example {i}", fields)
                position += 1
    else:
        for k, item in enumerate(data):
            if k >= start:
                yield as_example(item, f"example {k}", fields)


def collate_pairs(processor, pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """SigLIPProcessor inputs of image-text pairs: pixel_values and fixed-length input_ids (long texts cut quietly:
    JsonlDataset counted them)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return processor(images=[p.image for p in pairs], texts=[p.text for p in pairs])
    except (ValueError, OSError) as e:
        raise DataError(f"cannot make a batch of {[p.source for p in pairs]}: {e}") from e


def collate(processor, examples: list[Example], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs with labels on the suffix (right padding: the loss needs no left alignment)."""
    try:
        return processor(images=[e.image for e in examples], prompts=[e.prefix for e in examples],
                         suffixes=[e.suffix for e in examples], padding_side="right", max_length=max_length)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot make a batch of {[e.source for e in examples]}: {e}") from e
