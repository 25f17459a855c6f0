"""From images and prompts to answer texts, the one path: processor -> the model's device -> generate -> decode.

    answers = generate_answers(model, processor, images, prompts, runtime=runtime, max_new_tokens=32)
    answers[0].text, answers[0].spans       # spans: ((start, end) in text, logprob) per generated token

The pipeline, the training-time evaluator and streaming (through `model_inputs`) all go through here, so
the batch always reaches the weights' device and <eos>/padding are cut the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanopali.inference.detokenize import IncrementalDecoder
from nanopali.inference.generate import generate, tokenizer_settings
from nanopali.inference.runtime import Runtime
from nanopali.models.paligemma import PaliGemma


@dataclass
class Answer:
    text: str
    spans: list[tuple[tuple[int, int], float]] = field(default_factory=list)  # per token: (start, end), logprob
    new_tokens: int = 0


def model_inputs(model: PaliGemma, processor, images: list, prompts: list[str], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """The processor's batch for loaded images and one prompt each, on the model's device (no labels)."""
    batch = processor(images=images, prompts=prompts, padding_side=padding_side)
    return {k: v.to(model.device) for k, v in batch.items() if k != "labels"}


class AnswerText:
    """Generated ids -> the answer's text as it grows, and where each token's text lies in it.

    push(id, logprob) returns the new piece of text (possibly ""); finish() returns the Answer. The caller
    decides where a row ends (<eos>, padding, a stop string): decode_answer, streaming and the continuous
    batch (batching.py) all build their text here, so they agree character for character."""

    def __init__(self, tokenizer):
        self.decoder = IncrementalDecoder(lambda x: tokenizer.decode(x, skip_special_tokens=True))
        self.spans: list[tuple[tuple[int, int], float]] = []

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return self.decoder.emitted

    def push(self, token: int, logprob: float = 0.0) -> str:
        begin = len(self.decoder.emitted)
        piece = self.decoder.push(token)
        self.spans.append(((begin, max(begin + 1, len(self.decoder.emitted))), logprob))
        return piece

    def finish(self) -> tuple[str, Answer]:
        """The rest of the text (an unfinished character as decoded) and the whole Answer."""
        rest = self.decoder.finish()
        return rest, Answer(self.decoder.emitted, self.spans, len(self.spans))


def decode_answer(tokenizer, ids: list[int], logprobs: list[float]) -> Answer:
    """The text of generated ids up to <eos> or padding, and where each token's text lies in it."""
    text = AnswerText(tokenizer)
    for i, lp in zip(ids, logprobs):
        if i in (tokenizer.eos_id, tokenizer.pad_id):
            break
        text.push(i, lp)
    return text.finish()[1]


@torch.no_grad()
def generate_answers(model: PaliGemma, processor, images: list, prompts: list[str], runtime: Runtime | None = None,
                     **generate_kwargs) -> list[Answer]:
    """One answer per (image, prompt); generate_kwargs are `generate`'s (the tokenizer's ids are the defaults)."""
    tokenizer = processor.tokenizer
    batch = model_inputs(model, processor, images, prompts)
    generate_kwargs = {**tokenizer_settings(tokenizer), **generate_kwargs}
    if generate_kwargs.get("stop_strings"):
        generate_kwargs.setdefault("tokenizer", tokenizer)
    out = generate(model, **batch, return_logprobs=True, runtime=runtime, **generate_kwargs)
    return [decode_answer(tokenizer, ids, lps) for ids, lps in zip(out.tokens.tolist(), out.logprobs.tolist())]
