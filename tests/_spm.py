"""Test helpers: tiny Gemma-style SentencePiece tokenizers, trained in milliseconds, written in Hugging Face
layout, and transformers' PaliGemmaProcessor built from the same files as the reference.

The models mirror Gemma's tokenizer.model settings (BPE, byte fallback, split digits, no dummy prefix,
no whitespace collapsing, identity normalization, pad=0 eos=1 bos=2 unk=3, `<mask>` as a piece) with a
vocabulary of a few hundred pieces. PaliGemma's extra tokens reach them in one of four ways:

- "baked":      `<loc>`, `<seg>`, `<image>` (and `\\n`) are user-defined pieces of the SentencePiece model,
                as in big_vision's paligemma tokenizer.
- "added":      they are declared in tokenizer_config.json's added_tokens_decoder after the model's ids,
                as in the Hub repos; `\\n` is not a piece, so it goes through byte fallback.
- "added_json": the same, declared in added_tokens.json plus special_tokens_map.json instead.
- "bare":       declared nowhere; both transformers' processor and nanopali append them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm

LOC = [f"<loc{i:04d}>" for i in range(1024)]
SEG = [f"<seg{i:03d}>" for i in range(128)]
EXTRA = LOC + SEG + ["<image>"]
VARIANTS = ("baked", "added", "added_json", "bare")
ROLES = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}

_WORDS = (
    "the a an of in on at with and or is are was caption describe answer question detect segment what where "
    "how many cat cats dog dogs sitting standing bench table chair red blue green yellow car bus tree house "
    "person people man woman child sky cloud water river mountain street city photo picture image left right "
    "en es fr de zh"
).split()
_UNICODE = "café über naïve niño façade 東京 北京 猫 犬 привет мир γειά σου ✓ ±".split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic lines of words, unicode words, numbers and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS if rng.random() < 0.9 else _UNICODE) for _ in range(rng.randint(2, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice(["", ".", "?", "!", ",", " ;"]))
    return lines


def train(user_defined: list[str], merges: int = 300, **overrides) -> bytes:
    """A Gemma-style BPE SentencePiece model (serialized) with `user_defined` pieces right after the control ids."""
    options = dict(
        model_type="bpe", vocab_size=4 + len(user_defined) + 256 + merges, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=user_defined, minloglevel=2, num_threads=1,
    )
    options.update(overrides)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=out, **options)
    return out.getvalue()


def _json(file: Path, data) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _decoder_entry(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": special}


def write_checkpoint(folder: Path, variant: str, image_size: int = 32, num_image_tokens: int = 4) -> Path:
    """A tokenizer directory in HF layout for `variant`, plus a preprocessor_config.json. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if variant == "baked":
        model = train(["<mask>", "\n"] + EXTRA)
    elif variant in ("added", "added_json"):
        model = train(["<mask>"])
    elif variant == "bare":
        model = train(["<mask>", "\n"])
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    (folder / "tokenizer.model").write_bytes(model)
    base = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
    if variant == "added":
        config["added_tokens_decoder"] = {str(base + i): _decoder_entry(t, t == "<image>") for i, t in enumerate(EXTRA)}
    if variant == "added_json":
        _json(folder / "added_tokens.json", {t: base + i for i, t in enumerate(EXTRA)})
        _json(folder / "special_tokens_map.json", {**ROLES, "additional_special_tokens": ["<image>"]})
    else:
        config.update(ROLES)
    _json(folder / "tokenizer_config.json", config)
    write_preprocessor_config(folder, image_size, num_image_tokens)
    return folder


def write_preprocessor_config(folder: Path, image_size: int, num_image_tokens: int) -> None:
    _json(folder / "preprocessor_config.json", {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": num_image_tokens,
    })


def hf_processor(folder: Path):
    """transformers' PaliGemmaProcessor read from `folder` (its tokenizer then has the loc/seg/image tokens)."""
    import transformers

    transformers.logging.set_verbosity_error()  # the "you are passing both text and images" notice, every call
    return transformers.PaliGemmaProcessor.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------- SigLIP text tokenizers

SIGLIP_VARIANTS = ("siglip", "siglip-cased", "siglip2", "siglip2-lower-eos")


def train_t5(vocab_size: int = 400) -> bytes:
    """A T5-style SentencePiece model like SigLIP's `spiece.model` (unigram, NFKC with dummy prefix and whitespace
    collapsing, pad=0 eos=1 unk=2, no bos)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, model_type="unigram", vocab_size=vocab_size,
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", minloglevel=2, num_threads=1)
    return out.getvalue()


def write_siglip_checkpoint(folder: Path, variant: str, image_size: int = 32) -> Path:
    """The tokenizer and preprocessor files of a SigLIP (spiece.model, SiglipTokenizer; "-cased": do_lower_case off)
    or SigLIP 2 (Gemma tokenizer.model; GemmaTokenizer, or Siglip2Tokenizer with add_eos_token) checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    if variant.startswith("siglip2"):
        (folder / "tokenizer.model").write_bytes(train(["<mask>"]))
        config = {**ROLES, "tokenizer_class": "GemmaTokenizer"}
        if variant == "siglip2-lower-eos":
            config.update(tokenizer_class="Siglip2Tokenizer", add_eos_token=True, padding_side="right")
    elif variant in ("siglip", "siglip-cased"):
        (folder / "spiece.model").write_bytes(train_t5())
        config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": 64, "eos_token": "</s>",
                  "pad_token": "</s>", "unk_token": "<unk>", "do_lower_case": variant == "siglip"}
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {SIGLIP_VARIANTS}")
    _json(folder / "tokenizer_config.json", config)
    _json(folder / "preprocessor_config.json", {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor", "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    return folder


def hf_siglip_processor(folder: Path):
    """transformers' processor of a SigLIP checkpoint directory (SiglipProcessor: image processor + AutoTokenizer)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.SiglipProcessor(transformers.AutoImageProcessor.from_pretrained(str(folder)),
                                        transformers.AutoTokenizer.from_pretrained(str(folder)))
