"""SigLIP's processor: images and texts in, the contrastive model's tensors out (transformers' SiglipProcessor
with padding="max_length", truncation=True, id for id and pixel for pixel).

    batch = SigLIPProcessor.from_pretrained(dir)(images=[...], texts=[...])
    batch["pixel_values"]  float32 (N_img, 3, S, S)   resized, rescaled, normalized as PaliGemma's (inputs/images.py)
    batch["input_ids"]     int64 (N_txt, L)           every text padded (or cut) to L = 64, the trained length

Images and texts are independent (any number of each; either may be left out). A text longer than L is cut
keeping its closing token, with a warning naming it (the text tower cannot see past L; transformers would
instead fail in the model). No attention mask is returned: SigLIP was trained attending to the pads.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from nanopali.errors import MissingFileError, UsageError
from nanopali.inputs.images import DEFAULT_MAX_PIXELS, preprocess
from nanopali.inputs.processor import image_settings
from nanopali.inputs.siglip_tokenizer import GemmaTextTokenizer, SiglipTokenizer, text_tokenizer
from nanopali.json_files import read_json


class TextTruncatedWarning(UserWarning):
    """A text was longer than the text tower's fixed length and was cut; `index` is its place in the batch."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


class SigLIPProcessor:
    def __init__(self, tokenizer: SiglipTokenizer | GemmaTextTokenizer, image_size: int, max_length: int = 64,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5),
                 rescale_factor: float = 1 / 255, resample: int = Image.Resampling.BICUBIC,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        for name, value in (("image_size", image_size), ("max_length", max_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{name} must be a positive int, got {value!r}")
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.image_mean, self.image_std = tuple(map(float, image_mean)), tuple(map(float, image_std))
        self.rescale_factor, self.resample, self.max_pixels = float(rescale_factor), int(resample), max_pixels

    def __call__(self, images=None, texts: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """pixel_values for `images` (one image or a list), input_ids for `texts` (one str or a list)."""
        if images is None and texts is None:
            raise UsageError("give images=, texts= or both")
        batch = {}
        if images is not None:
            batch["pixel_values"] = self.preprocess_images(images)
        if texts is not None:
            batch["input_ids"] = self.encode_texts(texts)
        return batch

    def preprocess_images(self, images) -> torch.Tensor:
        """One image or a list of images (anything load_image takes) -> float32 (N, 3, S, S)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise UsageError("empty batch: no images were given")
        return preprocess(images, self.image_size, self.max_pixels, mean=self.image_mean, std=self.image_std,
                          rescale_factor=self.rescale_factor, resample=self.resample)

    def encode_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """One text or a list -> int64 (N, max_length), padded with the pad id on the tokenizer's side."""
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise UsageError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        if not texts:
            raise UsageError("empty batch: no texts were given")
        L, tok = self.max_length, self.tokenizer
        rows = []
        for i, text in enumerate(texts):
            ids = tok.encode(text)
            if len(ids) > L:
                warnings.warn(TextTruncatedWarning(
                    f"text {i} ({text[:40]!r}{'…' if len(text) > 40 else ''}) is {len(ids)} tokens; it was cut to {L}, the "
                    "text tower's fixed length", i), stacklevel=3)
                tail = ids[-1:] if tok.ends_with_eos else []
                ids = ids[: L - len(tail)] + tail
            pad = [tok.pad_id] * (L - len(ids))
            rows.append(ids + pad if tok.padding_side == "right" else pad + ids)
        return torch.tensor(rows, dtype=torch.long)

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "SigLIPProcessor":
        """The tokenizer files and preprocessor_config.json of a checkpoint directory; the image size and text length
        fall back to config.json."""
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"checkpoint directory {path} does not exist")
        tokenizer = text_tokenizer(path)
        settings, _ = image_settings(path)
        settings.pop("num_image_tokens", None)
        config = read_json(path / "config.json", UsageError)
        if "image_size" not in settings:
            size = config.get("vision_config", {}).get("image_size")
            if size is None:
                raise MissingFileError(f"{path}: no preprocessor_config.json or config.json says the image size")
            settings["image_size"] = size
        settings["max_length"] = config.get("text_config", {}).get("max_position_embeddings", 64)
        return cls(tokenizer, **{**settings, **overrides})

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer files and a preprocessor_config.json that transformers reads too."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        config = {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
                  "do_convert_rgb": True, "do_resize": True, "size": {"height": self.image_size, "width": self.image_size},
                  "resample": self.resample, "do_rescale": True, "rescale_factor": self.rescale_factor,
                  "do_normalize": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std)}
        (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return (f"SigLIPProcessor(image_size={self.image_size}, max_length={self.max_length}, "
                f"tokenizer={type(self.tokenizer).__name__}(vocab_size={self.tokenizer.vocab_size}))")
