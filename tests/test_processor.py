"""nanopali.processor.Processor against transformers' PaliGemmaProcessor built from the same files.

Compared: input_ids, attention_mask, token_type_ids and labels (identical) and pixel_values (to 1e-6), over
plain, unicode, empty and `<loc>`/`\\n` prompts, suffixes, batches of different lengths padded left and
right, max_length, suffix truncation, several images per prompt and prompts that already hold `<image>`,
for each of the four tokenizer layouts of tests/_spm.py. Then one test per bad input.
"""

from __future__ import annotations

import json
import shutil

import _spm
import numpy as np
import pytest
import torch
from PIL import Image

from nanopali.config import PaliGemmaConfig, VisionConfig
from nanopali.inputs.images import ImageError, ImageTooLargeError
from nanopali.inputs.processor import Processor
from nanopali.inputs.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers")  # numpy 2 notices from transformers

PROMPTS = [
    "caption en", "", "answer en what is in this image?", "détecte 東京 🙂 ∑", " leading and  double spaces",
    "detect cat <loc0001><loc1023> ; dog <seg000><seg127>", "line one\nline two", "trailing newline\n",
    "tabs\there", "<bos> and <eos> written in the prompt",
]
SUFFIXES = [
    "a cat on a bench", "", "two", "<loc0010><loc0020><loc0030><loc0040> cat", "東京 🙂", "multi\nline",
    " space first", "<seg001><seg002>", "ends with newline\n", "long " * 12,
]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    """Images of different sizes and modes (RGB, RGBA, L), so resizing and RGB conversion both matter."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.integers(9, 70, size=2)
        channels = (3, 4, 1)[i % 3]
        array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        out.append(Image.fromarray(array[..., 0] if channels == 1 else array))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("processors")
    return {v: _spm.write_checkpoint(root / v, v, image_size=32, num_image_tokens=4) for v in _spm.VARIANTS}


@pytest.fixture(scope="module", params=_spm.VARIANTS)
def pair(request, folders):
    folder = folders[request.param]
    return Processor.from_pretrained(folder), _spm.hf_processor(folder)


def assert_same(ours: Processor, hf, images, prompts, suffixes=None, padding_side="left", max_length=None, truncate=False):
    got = ours(images=images, prompts=prompts, suffixes=suffixes, padding_side=padding_side, max_length=max_length,
               truncate_suffix=truncate)
    options = dict(padding="max_length", max_length=max_length) if max_length else dict(padding="longest")
    if truncate:
        options["truncation"] = "only_second"
    want = hf(images=images, text=prompts, suffix=suffixes, return_tensors="pt", padding_side=padding_side, **options)
    keys = ["input_ids", "attention_mask", "token_type_ids"] + (["labels"] if suffixes is not None else [])
    assert set(got) == set(keys) | {"pixel_values"}
    for key in keys:
        assert got[key].dtype == torch.long and torch.equal(got[key], want[key]), f"{key}:\n{got[key]}\n{want[key]}"
    assert got["pixel_values"].dtype == torch.float32 and got["pixel_values"].shape == want["pixel_values"].shape
    assert torch.allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
    return got


def test_reference_uses_the_pil_image_processor(pair):
    """Without torchvision, transformers 5 picks SiglipImageProcessorPil; that is what pixel_values are compared with."""
    assert type(pair[1].image_processor).__name__ == "SiglipImageProcessorPil"


def test_single_prompts(pair):
    ours, hf = pair
    (image,) = _images(1)
    for prompt, suffix in zip(PROMPTS, SUFFIXES):
        assert_same(ours, hf, [image], [prompt])
        assert_same(ours, hf, [image], [prompt], [suffix])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batches_of_different_lengths(pair, padding_side):
    ours, hf = pair
    images = _images(len(PROMPTS))
    assert_same(ours, hf, images, PROMPTS, padding_side=padding_side)
    got = assert_same(ours, hf, images, PROMPTS, SUFFIXES, padding_side=padding_side)
    assert (got["attention_mask"] == 0).any(), "the batch should need padding"
    longest = got["input_ids"].shape[1]
    assert_same(ours, hf, images, PROMPTS, SUFFIXES, padding_side=padding_side, max_length=longest + 3)
    # Cut suffixes (transformers' truncation="only_second"): the prompts fit, some suffixes do not.
    fits = max(len(ours.prefix_ids(p)) for p in PROMPTS[:4]) + 3
    got = assert_same(ours, hf, images[:4], PROMPTS[:4], SUFFIXES[-4:], padding_side=padding_side, max_length=fits, truncate=True)
    has_eos = (got["input_ids"] == ours.tokenizer.eos_id).any(dim=1)
    assert has_eos.any() and not has_eos.all(), f"some suffixes, not all, should have lost their <eos>: {has_eos}"


def test_several_images_per_prompt(pair):
    ours, hf = pair
    a, b, c = _images(3, seed=1)
    images = [[a, b], [c], [a, b, c]]
    got = assert_same(ours, hf, images, PROMPTS[:3], SUFFIXES[:3])
    assert got["pixel_values"].shape[0] == 6
    assert (got["input_ids"][2] == ours.tokenizer.image_token_id).sum() == 3 * ours.num_image_tokens
    assert_same(ours, hf, images, PROMPTS[:3], padding_side="right")


def test_prompts_that_already_hold_image_tokens(pair):
    ours, hf = pair
    a, b = _images(2, seed=2)
    assert_same(ours, hf, [[a, b], [b, a]], ["<image><image>caption en", "<image>x<image> y"], ["one", "two"])
    got = assert_same(ours, hf, [a], ["caption <image> en"])
    tok = ours.tokenizer
    assert got["input_ids"][0].tolist() == tok.encode("caption ") + [tok.image_token_id] * 4 + [tok.bos_id] + tok.encode(" en\n")


def test_layout(pair):
    """The layout, spelled out independently of transformers."""
    ours, _ = pair
    tok = ours.tokenizer
    got = ours(images=_images(1), prompts="caption en", suffixes="a cat", padding_side="right", max_length=20)
    prefix = [tok.image_token_id] * 4 + [tok.bos_id] + tok.encode("caption en\n")
    suffix = tok.encode("a cat") + [tok.eos_id]
    pad = 20 - len(prefix) - len(suffix)
    assert got["input_ids"][0].tolist() == prefix + suffix + [tok.pad_id] * pad
    assert got["attention_mask"][0].tolist() == [1] * (len(prefix) + len(suffix)) + [0] * pad
    assert got["token_type_ids"][0].tolist() == [0] * len(prefix) + [1] * len(suffix) + [0] * pad
    assert got["labels"][0].tolist() == [-100] * len(prefix) + suffix + [-100] * pad
    assert ours.decode(got["input_ids"][0]) == "caption en\na cat"
    assert ours.batch_decode(got["input_ids"]) == ["caption en\na cat"]


def test_every_image_input_kind(pair, tmp_path):
    ours, _ = pair
    image = _images(1)[0].convert("RGB")
    image.save(tmp_path / "a.png")
    array = np.asarray(image)
    want = ours(images=[image], prompts=["x"])["pixel_values"]
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), (tmp_path / "a.png").read_bytes(), array,
                   torch.from_numpy(array.copy()).permute(2, 0, 1)):
        assert torch.equal(ours(images=source, prompts="x")["pixel_values"], want), type(source).__name__


# ---------------------------------------------------------------------- from_pretrained / save_pretrained


def test_save_pretrained_is_read_back_by_both(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    again, hf = Processor.from_pretrained(tmp_path), _spm.hf_processor(tmp_path)
    assert (again.image_size, again.num_image_tokens, again.tokenizer.vocab_size) == (32, 4, ours.tokenizer.vocab_size)
    images = _images(4, seed=3)
    want = assert_same(again, hf, images, PROMPTS[:4], SUFFIXES[:4])
    got = ours(images=images, prompts=PROMPTS[:4], suffixes=SUFFIXES[:4])
    assert all(torch.equal(got[k], want[k]) for k in got)


def _model_config(folder, image_size=28, patch_size=14, image_token_index=None):
    """A config.json (nanopali's writer) whose image token id is the tokenizer's unless given."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=image_size, patch_size=patch_size)
    image_token_index = image_token_index or Tokenizer.from_pretrained(folder).image_token_id
    PaliGemmaConfig(vision_config=vision, image_token_index=image_token_index).save_pretrained(folder)


def test_image_settings_fall_back_to_config_json(folders, tmp_path):
    shutil.copytree(folders["added"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="says the image size"):
        Processor.from_pretrained(tmp_path)
    _model_config(tmp_path)
    proc = Processor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.num_image_tokens) == (28, 4)
    assert proc(images=_images(1), prompts="x")["pixel_values"].shape == (1, 3, 28, 28)


def test_processor_config_json_as_transformers_5_writes_it(folders, tmp_path):
    shutil.copytree(folders["added"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "preprocessor_config.json").unlink()
    nested = {"image_processor": {"size": {"height": 48, "width": 48}, "image_seq_length": 9, "resample": 3},
              "processor_class": "PaliGemmaProcessor"}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    proc = Processor.from_pretrained(tmp_path)
    assert (proc.image_size, proc.num_image_tokens) == (48, 9)


def test_files_that_disagree(folders, tmp_path):
    shutil.copytree(folders["added"], tmp_path, dirs_exist_ok=True)
    _model_config(tmp_path, image_size=56)  # 16 image tokens, the preprocessor says 32 px and 4 tokens
    with pytest.raises(ValueError, match="gives the image size as 32 but config.json gives 56"):
        Processor.from_pretrained(tmp_path)
    _model_config(tmp_path, image_size=32, patch_size=16, image_token_index=7)
    with pytest.raises(ValueError, match="image token is id 7"):
        Processor.from_pretrained(tmp_path)
    _model_config(tmp_path, image_size=32, patch_size=16)
    assert Processor.from_pretrained(tmp_path).num_image_tokens == 4
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "do_normalize": False}))
    with pytest.raises(ValueError, match="do_normalize=False"):
        Processor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- one test per bad input


@pytest.fixture(scope="module")
def proc(folders):
    return Processor.from_pretrained(folders["added"])


def test_a_prompt_that_is_not_a_string(proc):
    with pytest.raises(TypeError, match="prompt 1 is a int, not a str"):
        proc(images=_images(2), prompts=["caption en", 42])
    with pytest.raises(TypeError, match="suffix 0 is a NoneType"):
        proc(images=_images(1), prompts=["caption en"], suffixes=[None])


def test_more_images_than_prompts(proc):
    with pytest.raises(ValueError, match="got 3 images for 2 prompts.*list of lists"):
        proc(images=_images(3), prompts=["a", "b"])


def test_fewer_images_than_prompts(proc):
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        proc(images=_images(1), prompts=["a", "b"])
    with pytest.raises(ValueError, match="got 1 image lists for 2 prompts"):
        proc(images=[_images(2)], prompts=["a", "b"])
    with pytest.raises(ValueError, match="prompt 1 has an empty image list"):
        proc(images=[_images(1), []], prompts=["a", "b"])
    with pytest.raises(ValueError, match="no images were given"):
        proc(images=None, prompts=["a"])


def test_an_empty_batch(proc):
    with pytest.raises(ValueError, match="empty batch: no prompts"):
        proc(images=[], prompts=[])
    with pytest.raises(ValueError, match="empty batch: no images"):
        proc(images=[], prompts=["a"])


def test_a_prompt_that_does_not_fit_max_length(proc):
    with pytest.raises(ValueError, match=r"prompt 1 takes \d+ tokens \(4 image tokens \+ \d+ for <bos>.*max_length=8"):
        proc(images=_images(2), prompts=["a", "a much longer prompt than that"], max_length=8)
    with pytest.raises(ValueError, match="prompt 0 with its suffix takes .* truncate_suffix=True"):
        proc(images=_images(1), prompts=["a"], suffixes=["a suffix that is far too long"], max_length=10)


def test_image_tokens_that_do_not_match_the_images(proc):
    with pytest.raises(ValueError, match=r"prompts \[1\] have no <image>"):
        proc(images=_images(2), prompts=["<image>a", "b"])
    with pytest.raises(ValueError, match="prompt 0 contains 2 <image> tokens but has 1 images"):
        proc(images=_images(1), prompts=["<image><image>a"])
    with pytest.raises(ValueError, match="suffix 0 contains <image>"):
        proc(images=_images(1), prompts=["a"], suffixes=["<image>"])


def test_bad_options(proc):
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        proc(images=_images(1), prompts="a", padding_side="middle")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        proc(images=_images(1), prompts="a", max_length=0)
    with pytest.raises(ValueError, match="got 2 suffixes for 1 prompts"):
        proc(images=_images(1), prompts="a", suffixes=["x", "y"])
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int"):
        Processor(proc.tokenizer, image_size=224, num_image_tokens=0)


def test_a_bad_image_is_named_by_its_place(proc, tmp_path):
    with pytest.raises(ImageError, match="image 1 of prompt 0: image file .*missing.png does not exist"):
        proc(images=[[_images(1)[0], tmp_path / "missing.png"]], prompts=["a"])
    with pytest.raises(TypeError, match="image 0 of prompt 1 is a dict"):
        proc(images=[[_images(1)[0]], [{}]], prompts=["a", "b"])
    small = Processor(proc.tokenizer, image_size=32, num_image_tokens=4, max_pixels=100)
    with pytest.raises(ImageTooLargeError, match="image 0 of prompt 0: .* over the limit of 100"):
        small(images=_images(1), prompts=["a"])


def test_a_tokenizer_without_pad(folders, tmp_path):
    tok = Tokenizer(folders["added"] / "tokenizer.model", special_tokens={"pad_token": None})
    assert tok.pad_id == 0  # read from the SentencePiece model's pad piece
    model = _spm.train(["<mask>"], pad_id=-1)
    (tmp_path / "tokenizer.model").write_bytes(model)
    with pytest.raises(ValueError, match="no pad token"):
        Processor(Tokenizer.from_pretrained(tmp_path), image_size=32, num_image_tokens=4)
