"""The pipeline (nanopali.load / Pali): every task end to end on a tiny checkpoint whose answers we script."""

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_tiny_checkpoint

import nanopali
from nanopali import generate
from nanopali.inference.generate import tokenizer_settings
from nanopali.pipeline import Detection, Segmentation
from nanopali.tasks import SegmentationVAE, parse_objects

VAE = Path(__file__).resolve().parent / "fixtures" / "vqvae" / "vae-random.npz"


@pytest.fixture(scope="module")
def pali(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), generation=2)
    shutil.copy(VAE, path / "vae-oid.npz")
    return nanopali.load(path)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # H 48, W 64


@contextmanager
def scripted(pali, text: str, bias: float = 30.0):
    """Make the model answer exactly `text` (then <eos>) by adding a large logit to the next scripted token."""
    tok = pali.processor.tokenizer
    ids = tok.encode(text) + [tok.eos_id]
    original, step = pali.model.decoder.logits, [0]

    def logits(h):
        out = original(h)
        out[..., ids[min(step[0], len(ids) - 1)]] += bias
        step[0] += 1
        return out
    pali.model.decoder.logits = logits
    try:
        yield ids
    finally:
        del pali.model.decoder.logits


def test_text_tasks_use_paligemma_prompts(pali, image):
    with scripted(pali, "a small red circle"):
        assert pali.caption(image) == "a small red circle"
    with scripted(pali, "two"):
        assert pali.answer(image, "how many?") == "two"
    with scripted(pali, "HELLO"):
        assert pali.ocr(image) == "HELLO"
    with scripted(pali, "a cat"):
        assert "".join(pali.stream(image, "caption es")) == "a cat"


def test_batched_calls_return_one_answer_per_image(pali, image):
    answers = pali.generate([image, image[:, ::-1].copy()], ["caption en", "ocr"], max_new_tokens=5)
    singles = [pali.generate(image, "caption en", max_new_tokens=5), pali.generate(image[:, ::-1].copy(), "ocr", max_new_tokens=5)]
    assert answers == singles
    assert pali.caption([image, image], max_new_tokens=5) == [singles[0], singles[0]]


def test_detect_gives_boxes_in_original_pixels_with_scores(pali, image):
    text = "<loc0100><loc0200><loc0800><loc0900> cat ; <loc0000><loc0000><loc0512><loc0512> hot dog"
    with scripted(pali, text):
        found = pali.detect(image, ["cat", "hot dog"])
    expected = parse_objects(text, image_size=(64, 48))
    assert [d.label for d in found] == ["cat", "hot dog"]
    assert [d.box for d in found] == [o.box for o in expected] == [(12, 4, 56, 37), (0, 0, 32, 24)]
    assert all(isinstance(d, Detection) and 0.5 < d.score <= 1.0 for d in found)
    assert found.text == text and found.dropped == []


def test_detect_score_is_the_geometric_mean_of_token_probabilities(pali, image):
    text = "<loc0100><loc0200><loc0800><loc0900> cat"
    batch = pali.processor(images=[image], prompts=["detect cat"])
    with scripted(pali, text, bias=12.0) as ids:  # likely, but far from certain
        out = generate(pali.model, **batch, max_new_tokens=10, return_logprobs=True,
                       **tokenizer_settings(pali.processor.tokenizer))  # as the pipeline: the tokenizer's vocabulary
    assert out.tokens[0].tolist() == ids  # the object's tokens, then <eos>
    expected = out.logprobs[0, :-1].mean().exp().item()
    assert 0.01 < expected < 0.99
    with scripted(pali, text, bias=12.0):
        (found,) = pali.detect(image, "cat", max_new_tokens=10)
    assert found.score == pytest.approx(expected, rel=1e-5)


def test_malformed_objects_are_dropped_with_a_reason(pali, image):
    with scripted(pali, "<loc0100><loc0200><loc0800> cat ; <loc0900><loc0200><loc0100><loc0900> dog"):
        found = pali.detect(image, ["cat", "dog"])
    assert list(found) == [] and len(found.dropped) == 2
    assert all(reason for _, reason, *_ in found.dropped)


def test_segment_decodes_masks_through_the_vae(pali, image):
    segs = " ".join(f"<seg{i:03d}>" for i in (5, 17, 99, 3, 64, 12, 127, 0, 45, 45, 8, 90, 33, 71, 2, 110)).replace(" ", "")
    text = f"<loc0100><loc0200><loc0800><loc0900>{segs} cat"
    with scripted(pali, text):
        found = pali.segment(image, "cat")
    vae = SegmentationVAE.from_npz(VAE)
    expected = parse_objects(text, image_size=(64, 48), vae=vae)[0]
    (seg,) = found
    assert isinstance(seg, Segmentation) and seg.mask.shape == (48, 64) and seg.mask.dtype == bool
    assert np.array_equal(seg.mask, expected.mask) and seg.box == expected.box
    assert seg.mask.any() and not seg.mask[:, :10].any()  # inside the box only (x0 = 12)


def test_segment_without_a_vae_is_a_clear_error(pali, image):
    bare = nanopali.pipeline.Pali(pali.model, pali.processor, vae=None, model_dir="/nowhere")
    with pytest.raises(FileNotFoundError, match="vae-oid.npz"):
        bare.segment(image, "cat")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_answers_as_on_the_cpu(pali, image, monkeypatch):
    """The processor's tensors follow the model to its device (they are made on the CPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 patch convolution, as on the CPU: the same greedy tokens
    on_gpu = nanopali.load(pali.model_dir, device="cuda")
    assert on_gpu.model.device.type == "cuda"
    assert on_gpu.caption([image, image[::-1]]) == pali.caption([image, image[::-1]])
    assert list(on_gpu.stream(image, "caption en", max_new_tokens=8)) == list(pali.stream(image, "caption en", max_new_tokens=8))
    assert on_gpu.segment(image, "cat").text == pali.segment(image, "cat").text


def test_fast_false_is_the_plain_decode_step_on_every_device(pali):
    """load(fast=False), the CLI's --no-fast: no compiled CPU kernel and no CUDA graph."""
    from nanopali.inference.cpu_kernels import FastLinear
    plain = nanopali.load(pali.model_dir, fast=False)
    assert pali.runtime.cuda_graphs and not plain.runtime.cuda_graphs
    assert pali.runtime.kernels.enabled and not plain.runtime.kernels.enabled
    assert any(isinstance(m, FastLinear) for m in pali.model.modules())
    assert not any(isinstance(m, FastLinear) for m in plain.model.modules())