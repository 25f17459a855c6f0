"""Streaming: pieces arrive as tokens do and concatenate to exactly the final decoded text."""

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_tiny_checkpoint

from nanopali import PaliGemma, Processor, generate, stream
from nanopali.inference.detokenize import IncrementalDecoder
from nanopali.inference.generate import generate_tokens, tokenizer_settings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return PaliGemma.from_pretrained(path), Processor.from_pretrained(path)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)


def test_incremental_decoder_handles_spaces_and_multibyte_characters(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    text = "a cat sat on 東京 ✓ café — привет <loc0012> end"
    ids = tok.encode(text)
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids), "the test text should need byte-fallback tokens"
    decoder = IncrementalDecoder(lambda x: tok.decode(x))
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces), "a piece carried half a character"
    assert sum(bool(p) for p in pieces) > 5, "text should arrive in many pieces"


@pytest.mark.parametrize("seed", range(4))
def test_stream_concatenates_to_the_generated_text(tiny, image, seed):
    model, processor = tiny
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=2.0)
    pieces = list(stream(model, processor, image, "caption en", generator=torch.Generator().manual_seed(seed), **kwargs))
    batch = processor(images=[image], prompts=["caption en"])
    ids = [int(t[0]) for t, _ in generate_tokens(model, **batch, generator=torch.Generator().manual_seed(seed), **kwargs)]
    ids = ids[: ids.index(processor.tokenizer.eos_id)] if processor.tokenizer.eos_id in ids else ids
    assert "".join(pieces) == processor.tokenizer.decode(ids)
    assert len(pieces) > 1


def test_stream_refuses_beams(tiny, image):
    model, processor = tiny
    with pytest.raises(ValueError, match="beam search cannot stream"):
        list(stream(model, processor, image, "caption en", num_beams=2))


def test_padding_rows_past_the_tokenizer_are_never_generated(tiny, image):
    model, processor = tiny
    real = processor.tokenizer.vocab_size
    settings = tokenizer_settings(processor.tokenizer)
    assert settings["vocab_limit"] == real < model.config.text_config.vocab_size
    batch = processor(images=[image], prompts=["caption en"])
    original = model.decoder.logits
    model.decoder.logits = lambda h: original(h).index_add(-1, torch.tensor([real + 2]), torch.full((*h.shape[:-1], 1), 1e4))
    try:
        assert generate(model, **batch, max_new_tokens=6, **settings).max() < real
        sampled = generate(model, **batch, max_new_tokens=6, do_sample=True, generator=torch.Generator().manual_seed(0),
                           **settings)
        assert sampled.max() < real
        assert generate(model, **batch, max_new_tokens=2, vocab_limit=real + 6).tolist() == [[real + 2] * 2]
    finally:
        del model.decoder.logits
