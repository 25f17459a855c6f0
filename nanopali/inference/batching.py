"""Continuous batching: rows that join a running batch at a step boundary and leave it as soon as they are done.

    batch = RowBatch(model, processor, runtime)
    batch.add([Row(image, "caption en", options, on_piece=print)])   # joins at the next step
    while batch:
        for row in batch.step():                                      # one token for every row
            print(row.finish_reason, row.answer.text)                 # the rows that ended in this step

`generate` decodes one fixed batch from its prefill to its end; a server gets requests at any time. Here
- the rows waiting to join are prefilled together, as one left-padded batch, at the start of a step;
- their KV-cache slots are laid beside the running rows' (decode.relayout: every row's slots right-aligned at
  one shared next slot, as left padding lays out a batch), so they decode in the same step as the others.
  The prefix-LM mask (nn/masks.py) allows holes and per-row positions, so a row gets the tokens it would get
  alone, up to the float rounding of a different batch shape;
- a row leaves as soon as it is done (<eos>, max_new_tokens, a stop string, or cancel()) and its slots go with
  it, so the cache only ever holds rows that are still decoding.

Every row has its own GenerationOptions (greedy or sampled with its own generator, max_new_tokens, stop
strings, ...); rows with the same picking options pick together (generate.next_token). Beam search cannot join
a running batch and is refused. The tokenizer fixes <eos>, padding and the vocabulary for all rows.

An error stays in its row: a joining group whose prefill raises is prefilled again one row at a time, and only
the rows that still raise end with `row.error`. An error in the shared decode step ends the rows decoding then
and leaves the batch empty and usable. One thread calls add() and step(); cancel() may come from any thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanopali.errors import UsageError
from nanopali.inference.answers import Answer, AnswerText, model_inputs
from nanopali.inference.decode import DecodeState, check_length, prefill, relayout
from nanopali.inference.generate import logit_rules, next_token, tokenizer_settings
from nanopali.inference.options import GenerationOptions
from nanopali.inference.runtime import Runtime
from nanopali.models.paligemma import PaliGemma

SHARED = ("eos_token_id", "pad_token_id", "vocab_limit")  # options the tokenizer fixes for every row of a batch
GROW = 64  # cache slots a relayout adds at most; a batch whose rows go on past them is laid out again


@dataclass(eq=False)
class Row:
    """One prompt about one image, decoding inside a RowBatch; what it produced so far is on the object."""

    image: object                 # an RGB PIL image (Pali.row loads and checks it)
    prompt: str
    options: GenerationOptions    # with the tokenizer's eos / pad / vocab_limit (Pali.row sets them)
    on_piece: Callable[[str], None] | None = None  # each new piece of text, called on the stepping thread
    prompt_tokens: int = 0        # the prefix's length in tokens (image tokens, <bos>, prompt, "\n")
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (<eos> or a stop string), "length", "cancelled" or "error"
    error: BaseException | None = None
    answer: Answer | None = None  # the text and its tokens' spans, once done
    cancelled: bool = False
    text: AnswerText | None = field(default=None, repr=False)       # set when the row is added
    prompt_ids: torch.Tensor | None = field(default=None, repr=False)  # set at its prefill
    picking: object = field(default=None, repr=False)  # rows with equal values pick their tokens together

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop this row at the next step boundary (from any thread); its finish_reason becomes "cancelled"."""
        self.cancelled = True


def check_row(model: PaliGemma, processor, row: Row) -> None:
    """What a row must satisfy to join a batch, checked without running the model (a UsageError names it):
    no beam search, the tokenizer's eos / pad / vocabulary, one <image> at most, and prompt + max_new_tokens
    within the model's positions. Sets row.prompt_tokens."""
    options, settings = row.options, GenerationOptions(**tokenizer_settings(processor.tokenizer))
    if options.num_beams > 1:
        raise UsageError(f"num_beams={options.num_beams}: beam search cannot join a running batch; use generate()")
    for name in SHARED:
        if getattr(options, name) != getattr(settings, name):
            raise UsageError(f"{name}={getattr(options, name)!r}: the rows of a batch share the tokenizer's "
                             f"{getattr(settings, name)!r}")
    if row.prompt.count(processor.tokenizer.image_token) > 1:
        raise UsageError(f"the prompt has {row.prompt.count(processor.tokenizer.image_token)} "
                         f"{processor.tokenizer.image_token} tokens, but a row has one image")
    row.prompt_tokens = len(processor.prefix_ids(row.prompt))
    check_length(model, row.prompt_tokens, options.max_new_tokens)


class RowBatch:
    """The running batch: its rows, their shared decode state and next-token logits (see the module docstring)."""

    def __init__(self, model: PaliGemma, processor, runtime: Runtime | None = None):
        self.model, self.processor, self.runtime = model, processor, runtime or Runtime()
        self.rules, _ = logit_rules(model, model.device, GenerationOptions(**tokenizer_settings(processor.tokenizer)))
        self.ends = {processor.tokenizer.eos_id, processor.tokenizer.pad_id}  # where decode_answer's text ends too
        self.rows: list[Row] = []      # decoding, in the order of the state's batch rows
        self.joining: list[Row] = []   # to be prefilled at the next step
        self.state: DecodeState | None = None
        self.logits: torch.Tensor | None = None  # float (len(rows), V): the rows' next-token logits

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def add(self, rows: list[Row]) -> None:
        """Rows that join at the next step (each checked by check_row: a UsageError names a bad one)."""
        for row in rows:
            check_row(self.model, self.processor, row)
            row.text = AnswerText(self.processor.tokenizer)
            row.picking = (dataclasses.replace(row.options, max_new_tokens=1, min_new_tokens=0, stop_strings=())
                           if row.options.repetition_penalty == 1.0 else row)  # a penalty looks at the row's own tokens
        self.joining.extend(rows)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Prefill the joining rows, pick one token for every row, and run one decode step for the rows that
        go on. Returns the rows that ended in this step (finished, cancelled or failed)."""
        ended = [row for row in self.rows + self.joining if row.cancelled and self._end(row, "cancelled")]
        joining, self.joining = [row for row in self.joining if not row.done], []
        live = [i for i, row in enumerate(self.rows) if not row.done]
        parts, logits, rows = [], [], []
        if live:
            index = torch.tensor(live, device=self.logits.device)
            parts.append((self.state, index))
            logits.append(self.logits[index])
            rows += [self.rows[i] for i in live]
        for state, first_logits, group in self._prefill(joining, ended):
            parts.append((state, torch.arange(len(group), device=first_logits.device)))
            logits.append(first_logits)
            rows += group
        self.rows, self.state, self.logits = [], None, None
        if not rows:
            return ended

        tokens = self._pick(rows, torch.cat(logits))
        for row, (token, logprob) in zip(rows, tokens):
            self._push(row, token, logprob)
        ended += [row for row in rows if row.done]
        keep = [i for i, row in enumerate(rows) if not row.done]
        if not keep:
            return ended
        try:
            state = self._layout(_kept(parts, keep), max(rows[i].options.max_new_tokens - len(rows[i].tokens)
                                                         for i in keep))
            next_tokens = torch.tensor([tokens[i][0] for i in keep], device=state.kv_valid.device)
            self.logits = state.step(self.model, next_tokens)
        except Exception as e:  # a failure of the shared step: the rows in it end, the batch stays usable
            for i in keep:
                self._end(rows[i], "error", e)
            return ended + [rows[i] for i in keep]
        self.rows, self.state = [rows[i] for i in keep], state
        return ended

    def abort(self, error: BaseException, rows: list[Row] = ()) -> list[Row]:
        """End every row of the batch (and `rows`, which never joined) with `error`; the batch is empty after."""
        ended = [row for row in [*self.rows, *self.joining, *rows] if not row.done]
        for row in ended:
            self._end(row, "error", error)
        self.rows, self.joining, self.state, self.logits = [], [], None, None
        return ended

    # ------------------------------------------------------------------ the parts of a step

    @staticmethod
    def _layout(parts: list[tuple[DecodeState, torch.Tensor]], needed: int) -> DecodeState:
        """The state the next decode step runs on. Without new rows and with a free slot, the running state
        itself (less the rows that left: one row selection, no new cache); else a relayout with room for
        GROW more tokens (or what the rows may still need, if less), so that rows which stop early (most do)
        never make every step attend over slots they will not use."""
        (state, rows), *others = parts
        if not others and state.slot < state.cache.max_len:
            if len(rows) < state.kv_valid.shape[0]:
                state.reorder(rows)
            return state
        return relayout(parts, room=min(GROW, needed))

    def _prefill(self, rows: list[Row], ended: list[Row]) -> list[tuple[DecodeState, torch.Tensor, list[Row]]]:
        """Prefill rows as one batch; if that raises, one at a time, ending only the rows that still raise."""
        if not rows:
            return []
        try:
            return [self._prefill_group(rows)]
        except Exception as e:
            if len(rows) == 1:
                self._end(rows[0], "error", e)
                ended.append(rows[0])
                return []
        groups = []
        for row in rows:
            try:
                groups.append(self._prefill_group([row]))
            except Exception as e:
                self._end(row, "error", e)
                ended.append(row)
        return groups

    def _prefill_group(self, rows: list[Row]) -> tuple[DecodeState, torch.Tensor, list[Row]]:
        batch = model_inputs(self.model, self.processor, [row.image for row in rows], [row.prompt for row in rows])
        self.model.check_inputs(batch["input_ids"], batch["pixel_values"])
        logits, state = prefill(self.model, **batch, runtime=self.runtime)
        for row, ids, mask in zip(rows, batch["input_ids"], batch["attention_mask"]):
            row.prompt_ids = ids[mask.bool()]  # what a repetition penalty looks at
        return state, logits, rows

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> list[tuple[int, float]]:
        """Each row's next token and its log-probability; rows with the same picking options pick together."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((row.picking, len(row.tokens) < row.options.min_new_tokens), []).append(i)
        picked = [None] * len(rows)
        for index in groups.values():
            row = rows[index[0]]
            rules, seen = self.rules, None
            if row.options.repetition_penalty != 1.0:  # a group of one row: its prompt and tokens, its penalty
                rules = dataclasses.replace(rules, repetition_penalty=row.options.repetition_penalty)
                seen = torch.cat([row.prompt_ids, torch.tensor(row.tokens, dtype=torch.long)]).to(logits.device)[None]
            token, logprob = next_token(logits[index], rules, row.options,
                                        ban_eos=len(row.tokens) < row.options.min_new_tokens, seen=seen)
            for i, t, lp in zip(index, token.tolist(), logprob.tolist()):
                picked[i] = (t, lp)
        return picked

    def _push(self, row: Row, token: int, logprob: float) -> None:
        if token in self.ends:
            self._end(row, "stop")
            return
        row.tokens.append(token)
        piece = row.text.push(token, logprob)
        if piece and row.on_piece is not None:
            row.on_piece(piece)
        if row.options.stop_strings and any(s in row.text.text for s in row.options.stop_strings):
            self._end(row, "stop")
        elif len(row.tokens) >= row.options.max_new_tokens:
            self._end(row, "length")

    def _end(self, row: Row, reason: str, error: BaseException | None = None) -> bool:
        end(row, reason, error)
        return True


def end(row: Row, reason: str, error: BaseException | None = None) -> None:
    """End a row: its finish_reason, error and answer (the text so far); a finished row's last piece goes out."""
    row.finish_reason, row.error = reason, error
    rest, row.answer = row.text.finish() if row.text is not None else ("", Answer(""))
    if rest and row.on_piece is not None and reason not in ("cancelled", "error"):
        row.on_piece(rest)


def _kept(parts: list[tuple[DecodeState, torch.Tensor]], keep: list[int]) -> list[tuple[DecodeState, torch.Tensor]]:
    """The parts of a step (state, its rows), each cut to the rows in `keep` (indices over all parts' rows)."""
    out, start, keep = [], 0, set(keep)
    for state, rows in parts:
        mine = [j for j in range(len(rows)) if start + j in keep]
        out.append((state, rows[torch.tensor(mine, dtype=torch.long, device=rows.device)]))
        start += len(rows)
    return out
