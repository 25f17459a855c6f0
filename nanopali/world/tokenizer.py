"""A small Gemma-style tokenizer for the toy world (nanopali/world/), written in Hugging Face layout.

    folder = train_world_tokenizer("runs/world")     # tokenizer.model, tokenizer_config.json, special_tokens_map.json…
    tok = Tokenizer.from_pretrained(folder)           # or Processor.from_pretrained once a config.json is there

The SentencePiece model has Gemma's settings (BPE, byte fallback, split digits, no dummy prefix, no
whitespace collapsing, identity normalization, pad=0 eos=1 bos=2 unk=3) and the layout of PaliGemma's
Hub checkpoints, only smaller:

    0-3          <pad> <eos> <bos> <unk>
    4            <mask>                    user-defined pieces, as in Gemma (transformers adds a <mask>
    5            "\\n"                      after <image> when the model has none); "\\n" ends every prefix
    6-1029       <loc0000>…<loc1023>       one id each
    1030-1157    <seg000>…<seg127>
    1158-1413    <0x00>…<0xFF>             byte fallback: any text still round-trips
    1414-…       characters and BPE merges of the world's text
    last         <image>                   an added token right after the model's ids, as in the Hub repos

`<image>` is last so that `vocab_size` (= its id + 1) is also the generation limit: the model never
emits an id at or above it. The merges are learnt from the text of `examples(make_scene(...))` with the
`<loc>`/`<seg>` tokens cut out (the text between them is what SentencePiece sees), plus every word of
the world's vocabulary lists, so each colour, shape and number word is one or two tokens.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import sentencepiece as spm

from nanopali.inputs.processor import Processor
from nanopali.inputs.tokenizer import LOC_TOKENS, SEG_TOKENS, Tokenizer
from nanopali.world.examples import examples
from nanopali.world.scenes import COLORS, NUMBERS, POSITIONS, SHAPES, WORDS, make_scene

CONTROL = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0-3, Gemma's order
MASK = "<mask>"
USER_DEFINED = (MASK, "\n") + LOC_TOKENS + SEG_TOKENS
NUM_BYTES = 256
DEFAULT_VOCAB_SIZE = 1700  # ~285 characters and merges: whole world words; past ~1750 the merges are noise
_ATOMIC = re.compile(r"<loc\d{4}>|<seg\d{3}>")


def world_text(seed: int = 0, n_scenes: int = 2000) -> list[str]:
    """The strings SentencePiece sees for the world: every prefix and suffix of `n_scenes` scenes, split at
    their `<loc>`/`<seg>` tokens (which are atomic ids), plus the world's vocabulary lists."""
    r = random.Random(seed)
    lines = []
    for _ in range(n_scenes):
        scene = make_scene(r)
        for ex in examples(scene, r):  # no VAE, so no segment examples: their words are added below
            for text in (ex["prefix"], ex["suffix"]):
                lines += [chunk for chunk in _ATOMIC.split(text) if chunk]
    words = [*SHAPES, *COLORS, *WORDS, *NUMBERS, *dict.fromkeys(w for p in POSITIONS for w in p.split()), *map(str, range(10))]
    lines += words + [" " + w for w in words]  # each word both first in a string and after a space
    lines += [f"segment {c} {s}" for c in COLORS for s in SHAPES] + [f"segment {s}" for s in SHAPES]
    return lines


def train_sentencepiece(lines: list[str], vocab_size: int) -> bytes:
    """A serialized Gemma-style BPE model of at most `vocab_size` pieces with USER_DEFINED baked in after the controls.
    Single-threaded, so the same lines give the same bytes."""
    floor = len(CONTROL) + len(USER_DEFINED) + NUM_BYTES
    if vocab_size <= floor:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for characters and merges; use more than {floor}")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,  # a smaller vocabulary when the text runs out of merges
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=CONTROL[0], eos_piece=CONTROL[1], bos_piece=CONTROL[2],
        unk_piece=CONTROL[3], user_defined_symbols=list(USER_DEFINED), num_threads=1, minloglevel=2,
    )
    return out.getvalue()


def train_world_tokenizer(
    out_dir: str | Path, seed: int = 0, n_scenes: int = 2000, vocab_size: int = DEFAULT_VOCAB_SIZE,
    image_size: int | None = None, num_image_tokens: int | None = None,
) -> Path:
    """Train the world's tokenizer and write it to `out_dir` in Hugging Face layout; returns `out_dir`.

    `vocab_size` bounds the number of ids, `<image>` included (fewer when the text has no more merges).
    With `image_size` and `num_image_tokens`, also writes preprocessor_config.json, so that
    `Processor.from_pretrained(out_dir)` works without a config.json."""
    if (image_size is None) != (num_image_tokens is None):
        raise ValueError("give both image_size and num_image_tokens (for preprocessor_config.json), or neither")
    model = train_sentencepiece(world_text(seed, n_scenes), vocab_size - 1)  # - 1: room for <image>
    tokenizer = Tokenizer(model, special_tokens={"mask_token": MASK})  # appends <image> after the last piece, special
    out_dir = Path(out_dir)
    if image_size is None:
        tokenizer.save_pretrained(out_dir)
    else:
        Processor(tokenizer, image_size=image_size, num_image_tokens=num_image_tokens).save_pretrained(out_dir)
    return out_dir
