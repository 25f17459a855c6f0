"""The one path from images and prompts to answers (inference/answers.py), shared by the pipeline, streaming
and training-time evaluation: the batch follows the model to its device, and every caller gets the same text."""

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_tiny_checkpoint

from nanopali import PaliGemma, Processor, load, stream
from nanopali.inference.answers import generate_answers, model_inputs
from nanopali.train.data import Example
from nanopali.train.evaluate import evaluate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("answers"))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)


def test_inputs_go_to_the_model_device(checkpoint, image):
    with torch.device("meta"):
        model = PaliGemma(PaliGemma.from_pretrained(checkpoint).config)
    batch = model_inputs(model, Processor.from_pretrained(checkpoint), [image, image], ["caption en", "ocr"])
    assert {v.device.type for v in batch.values()} == {"meta"}
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}


def test_pipeline_streaming_and_evaluation_give_the_same_answer(checkpoint, image):
    pali = load(checkpoint)
    text = pali.generate(image, "caption en", max_new_tokens=8)
    (answer,) = generate_answers(pali.model, pali.processor, [image], ["caption en"], max_new_tokens=8)
    assert answer.text == text and answer.new_tokens == len(answer.spans) > 0
    assert "".join(stream(pali.model, pali.processor, image, "caption en", max_new_tokens=8)) == text
    scores = evaluate(pali.model, pali.processor, [Example(image, "caption en", text.strip())], max_new_tokens=8)
    assert scores["caption/exact_match"] == 1.0


@cuda
def test_evaluation_on_a_gpu_scores_as_on_the_cpu(checkpoint, image):
    """train.evaluate once took the processor's CPU tensors to CUDA weights; now it goes through model_inputs."""
    examples = [Example(image, "caption en", "x"), Example(image[::-1].copy(), "ocr", "y")]
    cpu = PaliGemma.from_pretrained(checkpoint)
    gpu = PaliGemma.from_pretrained(checkpoint, device="cuda")
    processor = Processor.from_pretrained(checkpoint)
    want = generate_answers(cpu, processor, [e.image for e in examples], [e.prefix for e in examples])
    got = generate_answers(gpu, processor, [e.image for e in examples], [e.prefix for e in examples])
    assert [a.text for a in got] == [a.text for a in want]
    assert evaluate(gpu, processor, examples) == evaluate(cpu, processor, examples)


@pytest.mark.parametrize("call, message", [
    (dict(prompts=["caption en"], padding_side="middle"), "padding_side must be 'left' or 'right'"),
    (dict(prompts=["caption en"], max_length=0), "max_length must be a positive int"),
    (dict(prompts=["caption en"], suffixes=["a", "b"]), "2 suffixes for 1 prompts"),
    (dict(prompts=["caption en"], suffixes=["<image> a"]), "suffix 0 contains <image>"),
], ids=["padding side", "max_length 0", "suffix count", "image in suffix"])
def test_processor_mistakes_are_project_errors(checkpoint, image, call, message):
    """The CLI prints these as one line (a NanopaliError), and they stay ValueErrors for older callers."""
    from nanopali.errors import NanopaliError
    with pytest.raises(NanopaliError, match=message) as caught:
        Processor.from_pretrained(checkpoint)(images=[image], **call)
    assert isinstance(caught.value, ValueError)
