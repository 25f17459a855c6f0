"""Every generation option checked once, in one place, for the Python API and the CLI alike.

    options = GenerationOptions(max_new_tokens=16, do_sample=True, temperature=0.7)   # raises UsageError
    options.check_vocabulary(model.config.text_config.vocab_size)                     # eos / pad / vocab_limit

`generate`, `generate_tokens` (and so streaming, the pipeline and beam search) build one from their keyword
arguments; the CLI builds one from its flags (spelled as flags in the messages, `spell=`). A value that cannot
work is a UsageError naming the option, the value and what is allowed; nothing is silently replaced by a
default. The rules:

    max_new_tokens >= 1            min_new_tokens in [0, max_new_tokens]      num_beams >= 1
    temperature finite, >= 0       0 < top_p <= 1                             top_k >= 0
    repetition_penalty finite, > 0 length_penalty finite                      generator a torch.Generator or None
    stop_strings: non-empty strings (a single str is one stop string)
    eos_token_id(s), pad_token_id in [0, vocabulary rows); vocab_limit in [1, vocabulary rows]   (check_vocabulary)
    num_beams > 1 with do_sample, a generator, top_k, top_p, a temperature other than 0 or 1, or stop_strings: an error

do_sample=False (or temperature 0) is greedy decoding and ignores top_k / top_p / the generator, as in
transformers: they are still range-checked, so a value that could never work is an error either way.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import InitVar, dataclass, fields

import torch

from nanopali.errors import UsageError


def _api_spelling(name: str, value) -> str:
    return f"{name}={value!r}"


@dataclass(frozen=True)
class GenerationOptions:
    """How `generate` decodes; every field is checked when the object is made (see the module docstring)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    eos_token_id: int | tuple[int, ...] | None = None  # None: the config's; a list/tuple: any of them ends a row
    pad_token_id: int | None = None                    # None: the config's
    vocab_limit: int | None = None                     # None: every embedding row may be generated
    stop_strings: tuple[str, ...] = ()
    generator: torch.Generator | None = None
    spell: InitVar[Callable[[str, object], str] | None] = None  # (name, value) -> how a message names the option

    def __post_init__(self, spell) -> None:
        say = spell or _api_spelling

        def set_(name: str, value) -> None:  # normalizing a frozen field
            object.__setattr__(self, name, value)

        def bad(name: str, rule: str):
            return UsageError(f"{say(name, getattr(self, name))}: {rule}")

        def integer(name: str, low: int, rule: str) -> None:
            value = getattr(self, name)
            try:
                value = operator.index(value) if not isinstance(value, bool) else None
            except TypeError:
                value = None
            if value is None or value < low:
                raise bad(name, rule)
            set_(name, value)

        def real(name: str, ok, rule: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
                raise bad(name, rule)
            set_(name, float(value))

        # one option at a time: ranges and types
        integer("max_new_tokens", 1, "must be an integer >= 1")
        integer("min_new_tokens", 0, f"must be an integer between 0 and max_new_tokens ({self.max_new_tokens})")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"must be an integer between 0 and max_new_tokens ({self.max_new_tokens})")
        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "must be True or False")
        real("temperature", lambda t: t >= 0, "must be a finite number >= 0 (0 = greedy)")
        integer("top_k", 0, "must be an integer >= 0 (0 = no top-k cut)")
        real("top_p", lambda p: 0 < p <= 1, "must be in (0, 1] (1 = no nucleus cut)")
        real("repetition_penalty", lambda r: r > 0, "must be a finite number > 0 (1 = no penalty)")
        integer("num_beams", 1, "must be an integer >= 1 (1 = no beam search)")
        real("length_penalty", lambda x: True, "must be a finite number")
        if self.eos_token_id is not None:
            eos = self.eos_token_id.tolist() if isinstance(self.eos_token_id, torch.Tensor) else self.eos_token_id
            items = list(eos) if isinstance(eos, (list, tuple)) else [eos]
            if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
                raise bad("eos_token_id", "must be an int, a list of ints or None")
            set_("eos_token_id", tuple(int(i) for i in items))
        if self.pad_token_id is not None:
            integer("pad_token_id", -math.inf, "must be an int or None")
        if self.vocab_limit is not None:
            integer("vocab_limit", 1, "must be an integer >= 1 (None = every embedding row)")
        stops = () if self.stop_strings is None else (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise bad("stop_strings", "must be a list of non-empty strings")
        set_("stop_strings", tuple(stops))
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise UsageError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")

        # options that cannot work together
        if self.num_beams > 1:
            conflicts = [name for name, used in (
                ("do_sample", self.do_sample), ("temperature", self.temperature not in (0.0, 1.0)),
                ("top_k", self.top_k != 0), ("top_p", self.top_p != 1.0), ("generator", self.generator is not None),
                ("stop_strings", bool(self.stop_strings))) if used]
            if conflicts:
                named = ", ".join(say(name, getattr(self, name)) for name in conflicts)
                raise UsageError(f"{say('num_beams', self.num_beams)} (beam search) cannot be combined with {named}; "
                                 f"beam search is deterministic: use {say('num_beams', 1)} for sampling or stop strings")

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random (else greedy: argmax)."""
        return self.do_sample and self.temperature > 0

    def check_vocabulary(self, rows: int) -> None:
        """The id options against a model with `rows` embedding rows (ids 0..rows-1)."""
        for i in self.eos_token_id or ():
            if not 0 <= i < rows:
                raise UsageError(f"eos_token_id {i} is outside the model's vocabulary (ids 0..{rows - 1})")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < rows:
            raise UsageError(f"pad_token_id {self.pad_token_id} is outside the model's vocabulary (ids 0..{rows - 1})")
        if self.vocab_limit is not None and self.vocab_limit > rows:
            raise UsageError(f"vocab_limit={self.vocab_limit}: must be between 1 and the model's {rows} vocabulary rows")

    def kwargs(self) -> dict:
        """The options that differ from the defaults, and max_new_tokens: keyword arguments for `generate`
        and the pipeline (so that the tokenizer's eos / pad / vocabulary defaults still apply there)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_new_tokens" or not _same(value, f.default):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _same(value, default) -> bool:
    if value is None or default is None:
        return value is default
    if isinstance(value, tuple) or isinstance(default, tuple):
        return tuple(value) == tuple(default)
    return value == default


def generation_options(function: str, options: dict) -> GenerationOptions:
    """GenerationOptions of a function's keyword arguments; an unknown keyword is a TypeError naming it."""
    known = {f.name for f in fields(GenerationOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword arguments {unknown}; the generation options are "
                        f"{sorted(known)}")
    return GenerationOptions(**options)
