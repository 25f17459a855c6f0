"""SigLIPProcessor against transformers' SiglipProcessor (padding="max_length", truncation=True) on tokenizers
trained in the test: SigLIP's T5-style spiece.model (lower-cased and cased) and SigLIP 2's Gemma tokenizer (plain,
and lower-casing with <eos>). Ids identical, pixels within 1e-6 on photographs; then the bad inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import _spm
import numpy as np
import pytest
import torch
from PIL import Image

from nanopali import SigLIPProcessor
from nanopali.errors import ImageError, MissingFileError, UsageError
from nanopali.inputs.siglip_processor import TextTruncatedWarning

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers")

TEXTS = [
    "a photo of a cat.", "", "  A  Red  CIRCLE!! ", "what's up? Café über naïve 東京 🙂", "a cat</s>", "</s> leading",
    "x <unk> y", "tab\there\nnew line", "\u2581under\u2581score", "1234 56 7", "!!!", "MiXeD CaSe, with (punctuation)…",
    "a blue star and two yellow squares with the word \"rain\"",
]
LONG = ["word " * 70, "supercalifragilistic " * 20]
skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg"]


@pytest.fixture(scope="module", params=_spm.SIGLIP_VARIANTS)
def pair(request, tmp_path_factory):
    folder = _spm.write_siglip_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return SigLIPProcessor.from_pretrained(folder), _spm.hf_siglip_processor(folder)


def reference_ids(hf, texts):
    return hf(text=texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]


def test_ids_equal_transformers(pair):
    ours, hf = pair
    got = ours(texts=TEXTS)["input_ids"]
    assert got.shape == (len(TEXTS), 64) and got.dtype == torch.long
    want = reference_ids(hf, TEXTS)
    for i, text in enumerate(TEXTS):
        assert torch.equal(got[i], want[i]), f"{text!r}:\n{got[i].tolist()}\n{want[i].tolist()}"


def test_long_texts_are_cut_like_transformers_with_a_warning(pair):
    ours, hf = pair
    with pytest.warns(TextTruncatedWarning, match="cut to 64"):
        got = ours(texts=LONG)["input_ids"]
    assert torch.equal(got, reference_ids(hf, LONG))


def test_pixels_equal_transformers_on_photos(pair):
    ours, hf = pair
    folder = Path(skimage_data.__file__).parent
    photos = [Image.open(folder / name) for name in PHOTOS]
    got = ours(images=photos)["pixel_values"]
    want = hf(images=photos, return_tensors="pt")["pixel_values"]
    assert got.shape == want.shape == (len(PHOTOS), 3, 32, 32)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_images_and_texts_are_independent(pair):
    ours, _ = pair
    image = Image.fromarray(np.zeros((5, 7, 3), np.uint8))
    batch = ours(images=[image] * 2, texts="one text")
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape == (1, 64)
    assert set(ours(images=image)) == {"pixel_values"}
    assert set(ours(texts=["a", "b", "c"])) == {"input_ids"}


def test_save_pretrained_reads_back_the_same(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = SigLIPProcessor.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        assert torch.equal(back(texts=TEXTS + LONG)["input_ids"], ours(texts=TEXTS + LONG)["input_ids"])
    assert torch.equal(_spm.hf_siglip_processor(tmp_path)(text=TEXTS, padding="max_length", max_length=64,
                                                           return_tensors="pt")["input_ids"], ours(texts=TEXTS)["input_ids"])


def test_bad_inputs(pair, tmp_path):
    ours, _ = pair
    with pytest.raises(UsageError, match="give images=, texts= or both"):
        ours()
    with pytest.raises(UsageError, match="no texts"):
        ours(texts=[])
    with pytest.raises(UsageError, match="list of strings"):
        ours(texts=[1, 2])
    with pytest.raises(UsageError, match="surrogate|undecodable"):
        ours(texts=["bad \udcff byte"])
    with pytest.raises(ImageError, match="image 1"):
        ours(images=[Image.new("RGB", (4, 4)), tmp_path / "missing.png"])
    with pytest.raises(MissingFileError, match="no spiece.model"):
        SigLIPProcessor.from_pretrained(tmp_path)
