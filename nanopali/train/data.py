"""Training data: JSONL files (one example a line) or any Python sequence/iterable of examples.

    {"image": "relative/or/absolute/path.jpg", "prefix": "detect cat", "suffix": "<loc0123>… cat"}

Image paths are relative to the JSONL file. Every line is checked when the file is opened (valid
JSON, the three fields, an image file that exists and has a readable header); a bad line is an
error that names its line number, or with `skip_bad=True` is skipped and counted. Batches go
through the Processor, which turns suffixes into labels.

The order of examples is a pure function of (seed, position): example k of the stream is entry
`permutation(seed + epoch)[k % N]`, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from nanopali.errors import DataError, MissingFileError

FIELDS = ("image", "prefix", "suffix")


@dataclass
class Example:
    image: object   # a path, PIL image, array … anything the Processor accepts
    prefix: str
    suffix: str
    source: str = ""  # "file.jsonl:12", for error messages
    extra: dict = field(default_factory=dict)  # further fields of a dict item, e.g. labels for an auxiliary loss


class JsonlDataset(Sequence):
    def __init__(self, path: str | Path, skip_bad: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"training data {self.path} does not exist")
        self.examples: list[Example] = []
        self.skipped: list[str] = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                self.examples.append(self._parse(line, f"{self.path}:{number}"))
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append(str(e))
        if not self.examples:
            raise DataError(f"{self.path} holds no usable example" + (f" ({len(self.skipped)} skipped)" if self.skipped else ""))

    def _parse(self, line: str, where: str) -> Example:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with fields {FIELDS}")
        missing = [f for f in FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise DataError(f"{where}: missing or non-string field(s) {missing}")
        image = Path(record["image"])
        image = image if image.is_absolute() else self.path.parent / image
        if not image.is_file():
            raise DataError(f"{where}: image {image} does not exist")
        try:
            with Image.open(image) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for unreadable files
            raise DataError(f"{where}: image {image} cannot be read ({e})") from None
        return Example(image, record["prefix"], record["suffix"], where)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def as_example(item, where: str) -> Example:
    if isinstance(item, Example):
        return item
    if isinstance(item, dict) and all(f in item for f in FIELDS):
        return Example(item["image"], item["prefix"], item["suffix"], where,
                       {k: v for k, v in item.items() if k not in FIELDS})
    raise DataError(f"{where}: expected an Example or a dict with fields {FIELDS}, got {type(item).__name__}")


def example_stream(data: Sequence | Iterable, seed: int, start: int = 0) -> Iterator[Example]:
    """Examples from position `start` on: shuffled epochs for a sequence, in order for an iterable."""
    if isinstance(data, Sequence):
        n = len(data)
        position = start
        while True:
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            for i in order[offset:]:
                yield as_example(data[i], f"example {i}")
                position += 1
    else:
        for k, item in enumerate(data):
            if k >= start:
                yield as_example(item, f"example {k}")


def collate(processor, examples: list[Example], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs with labels on the suffix (right padding: the loss needs no left alignment)."""
    try:
        return processor(images=[e.image for e in examples], prompts=[e.prefix for e in examples],
                         suffixes=[e.suffix for e in examples], padding_side="right", max_length=max_length)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot make a batch of {[e.source for e in examples]}: {e}") from e
