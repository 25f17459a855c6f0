"""The processor: images and prompts in, the tensors PaliGemma takes out (transformers' PaliGemmaProcessor, id for id).

One example, as big_vision trains it and transformers lays it out (N = num_image_tokens per image):

    tokens          <image> x N*k   <bos>   prompt   \\n   suffix   <eos>   <pad>…
    attention_mask  1 ......................................................  0…
    token_type_ids  0 ................................ 0   1 ............ 1   0…
    labels          -100 ............................ -100  suffix ids  eos   -100…

- `prompt + "\\n"` is tokenized as one string (as transformers does), with no space added in front.
- A prompt that already contains `<image>` keeps its text before the last `<image>` where it is, and
  gets `<bos>` right after that last `<image>`, as transformers does. Every `<image>` becomes N tokens.
- Several images per prompt: pass a list of images per prompt; each adds its own N tokens, and
  pixel_values holds all images in order (prompt 0's images, then prompt 1's…).
- `<loc>`, `<seg>`, `<bos>`, `<eos>` written in a prompt are single tokens (transformers does the same).
- Padding goes left (for generation) or right; `max_length` pads every row to that length and is an
  error, not a silent cut, when a prompt does not fit. Only a suffix may be cut, and only with
  `truncate_suffix=True` (transformers' truncation="only_second").

Where transformers does something surprising, nanopali raises instead: a batch where only some
prompts contain `<image>` (transformers then inserts `<bos>` at character 6 of the others), a prompt
whose `<image>` count differs from its number of images, or a suffix containing `<image>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from nanopali.errors import ConfigError, MissingFileError, UsageError
from nanopali.inputs.images import DEFAULT_MAX_PIXELS, ImageError, load_image, pixel_values
from nanopali.inputs.tokenizer import Tokenizer, check_text
from nanopali.io.hf_checkpoint import checkpoint_dir
from nanopali.json_files import read_json as _read_json
from nanopali.nn.losses import IGNORE_INDEX  # label of positions that carry no loss (prefix and padding)

_IMAGE_KEYS = {"size", "image_seq_length", "image_mean", "image_std", "rescale_factor", "resample",
               "do_resize", "do_rescale", "do_normalize", "do_center_crop", "do_pad"}
_IMAGE_TYPES = (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor)


class Processor:
    """Turns images and prompts (and training suffixes) into input_ids, masks, labels and pixel_values."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int,
        num_image_tokens: int,
        image_mean: float | Sequence[float] = (0.5, 0.5, 0.5),
        image_std: float | Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        resample: int = Image.Resampling.BICUBIC,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        for name, value in (("image_size", image_size), ("num_image_tokens", num_image_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{name} must be a positive int, got {value!r}")
        for name in ("bos", "eos", "pad"):
            if getattr(tokenizer, f"{name}_id") is None:
                raise UsageError(f"the tokenizer has no {name} token, which PaliGemma's inputs need; declare {name}_token in tokenizer_config.json")
        image_mean, image_std = ([x] * 3 if isinstance(x, (int, float)) else list(x) for x in (image_mean, image_std))
        if len(image_mean) != 3 or len(image_std) != 3:
            raise UsageError(f"image_mean and image_std need 3 values (RGB), got {list(image_mean)} and {list(image_std)}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.image_mean, self.image_std = tuple(map(float, image_mean)), tuple(map(float, image_std))
        self.rescale_factor = float(rescale_factor)
        self.resample = int(resample)
        self.max_pixels = max_pixels

    # ------------------------------------------------------------------ the call

    def __call__(
        self,
        images,
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        padding_side: str = "left",
        max_length: int | None = None,
        truncate_suffix: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Returns input_ids, attention_mask, token_type_ids: int64[B, T]; pixel_values: float32[num_images, 3, S, S];
        and labels: int64[B, T] when `suffixes` are given.

        `images`: one image per prompt (a list, or a single image for a single prompt), or a list of lists
        for several images per prompt. An image is anything `nanopali.images.load_image` takes."""
        prompts = _strings(prompts, "prompt")
        suffixes = None if suffixes is None else _strings(suffixes, "suffix")
        if suffixes is not None and len(suffixes) != len(prompts):
            raise UsageError(f"got {len(suffixes)} suffixes for {len(prompts)} prompts; give one suffix per prompt")
        if padding_side not in ("left", "right"):
            raise UsageError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise UsageError(f"max_length must be a positive int or None, got {max_length!r}")
        per_prompt = _images_per_prompt(images, len(prompts))
        self._check_image_tokens(prompts, suffixes, per_prompt)

        rows = []
        for i, (prompt, imgs) in enumerate(zip(prompts, per_prompt)):
            prefix = self.prefix_ids(prompt, len(imgs))
            suffix = [] if suffixes is None else self.tokenizer.encode(suffixes[i]) + [self.tokenizer.eos_id]
            if max_length is not None:
                suffix = self._fit(i, prefix, suffix, len(imgs), max_length, truncate_suffix)
            rows.append((prefix, suffix))
        batch = self._pad(rows, max_length, padding_side, with_labels=suffixes is not None)
        batch["pixel_values"] = self._pixel_values(per_prompt)
        return batch

    def prefix_ids(self, prompt: str, num_images: int = 1) -> list[int]:
        """Ids of `<image> x N*num_images, <bos>, prompt, \\n` (or transformers' layout if the prompt has `<image>`)."""
        tok = self.tokenizer
        if tok.image_token not in prompt:
            return [tok.image_token_id] * (self.num_image_tokens * num_images) + [tok.bos_id] + tok.encode(prompt + "\n")
        end = prompt.rfind(tok.image_token) + len(tok.image_token)
        head = []
        for i in tok.encode(prompt[:end]):
            head += [i] * (self.num_image_tokens if i == tok.image_token_id else 1)
        return head + [tok.bos_id] + tok.encode(prompt[end:] + "\n")

    def preprocess_images(self, images) -> torch.Tensor:
        """One image or a list of images -> float32[num_images, 3, S, S]."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        return self._pixel_values([[img] for img in images], where="image {i}")

    def _pixel_values(self, per_prompt: list[list], where: str = "image {j} of prompt {i}") -> torch.Tensor:
        arrays = []
        for i, imgs in enumerate(per_prompt):
            for j, img in enumerate(imgs):
                try:
                    rgb = load_image(img, max_pixels=self.max_pixels)
                    arrays.append(pixel_values(rgb, self.image_size, self.image_mean, self.image_std, self.rescale_factor, self.resample))
                except ImageError as e:
                    raise type(e)(f"{where.format(i=i, j=j)}: {e}") from e
        return torch.from_numpy(np.stack(arrays))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ helpers of the call

    def _check_image_tokens(self, prompts, suffixes, per_prompt) -> None:
        token = self.tokenizer.image_token
        counts = [p.count(token) for p in prompts]
        if any(counts) and not all(counts):
            without = [i for i, c in enumerate(counts) if not c]
            raise UsageError(f"prompts {without} have no {token} while others do; put {token} in every prompt or in none")
        for i, (c, imgs) in enumerate(zip(counts, per_prompt)):
            if c and c != len(imgs):
                raise UsageError(f"prompt {i} contains {c} {token} tokens but has {len(imgs)} images; they must match")
        for i, s in enumerate(suffixes or []):
            if token in s:
                raise UsageError(f"suffix {i} contains {token}; image tokens belong in the prompt, not in the suffix")

    def _fit(self, i, prefix, suffix, num_images, max_length, truncate_suffix) -> list[int]:
        if len(prefix) > max_length:
            image_tokens = num_images * self.num_image_tokens
            raise UsageError(
                f"prompt {i} takes {len(prefix)} tokens ({image_tokens} image tokens + {len(prefix) - image_tokens} "
                f"for <bos>, the prompt and \\n), more than max_length={max_length}; shorten it or raise max_length"
            )
        if len(prefix) + len(suffix) > max_length:
            if not truncate_suffix:
                raise UsageError(
                    f"prompt {i} with its suffix takes {len(prefix) + len(suffix)} tokens ({len(prefix)} + {len(suffix)} "
                    f"for the suffix and <eos>), more than max_length={max_length}; raise max_length or pass truncate_suffix=True"
                )
            suffix = suffix[: max_length - len(prefix)]
        return suffix

    def _pad(self, rows, max_length, padding_side, with_labels) -> dict[str, torch.Tensor]:
        length = max_length or max(len(p) + len(s) for p, s in rows)
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        token_type_ids = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for b, (prefix, suffix) in enumerate(rows):
            n = len(prefix) + len(suffix)
            start = length - n if padding_side == "left" else 0
            cut = start + len(prefix)  # first suffix position
            input_ids[b, start : start + n] = torch.tensor(prefix + suffix, dtype=torch.long)
            attention_mask[b, start : start + n] = 1
            token_type_ids[b, cut : start + n] = 1
            labels[b, cut : start + n] = input_ids[b, cut : start + n]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if with_labels:
            batch["labels"] = labels
        return batch

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "Processor":
        """Tokenizer files plus image settings from preprocessor_config.json / processor_config.json,
        falling back to config.json (image_size, num_image_tokens). `overrides` go to the constructor."""
        path = Path(path)
        if path.is_file():
            checkpoint_dir(path)  # raises: a file is not a checkpoint directory (an .npz is told how to load)
        if not path.is_dir():
            raise MissingFileError(f"checkpoint directory {path} does not exist")
        tokenizer = Tokenizer.from_pretrained(path)
        settings, source = image_settings(path)
        model = _model_settings(path)
        for key, what in (("image_size", "the image size"), ("num_image_tokens", "the number of image tokens")):
            if key in settings and key in model and settings[key] != model[key]:
                raise ConfigError(
                    f"{path}: {source} gives {what} as {settings[key]} but config.json gives {model[key]}; fix one of them"
                )
            if key not in settings and key not in model:
                raise MissingFileError(f"{path}: no preprocessor_config.json, processor_config.json or config.json says {what}")
            settings.setdefault(key, model.get(key))
        if "image_token_index" in model and model["image_token_index"] != tokenizer.image_token_id:
            raise ConfigError(
                f"{path}: config.json says the image token is id {model['image_token_index']}, "
                f"but the tokenizer has {tokenizer.image_token} at id {tokenizer.image_token_id}"
            )
        return cls(tokenizer, **{**settings, **overrides})

    @classmethod
    def from_config(cls, config, tokenizer: Tokenizer | str | Path, **overrides) -> "Processor":
        """The processor of a checkpoint that is only weights (a big_vision .npz): `tokenizer` is a Tokenizer or
        the path of a SentencePiece model (big_vision's `paligemma_tokenizer.model`, `<loc>`/`<seg>` baked in,
        `<image>` appended after them), the image size and token count come from `config` (a PaliGemmaConfig),
        and pixels are scaled to [-1, 1] as big_vision does. `overrides` go to the constructor."""
        if not isinstance(tokenizer, Tokenizer):
            if not Path(tokenizer).expanduser().is_file():
                raise MissingFileError(f"tokenizer file {tokenizer} does not exist")
            tokenizer = Tokenizer.from_pretrained(Path(tokenizer).expanduser())
        rows = config.text_config.vocab_size
        if tokenizer.image_token_id != config.image_token_index:
            raise ConfigError(f"the tokenizer has {tokenizer.image_token} at id {tokenizer.image_token_id} but the config's "
                              f"image_token_index is {config.image_token_index}: they do not belong together")
        if len(tokenizer) > rows:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} rows "
                              "(text_config.vocab_size): they do not belong together")
        return cls(tokenizer, config.vision_config.image_size, config.num_image_tokens, **overrides)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer files and a preprocessor_config.json that transformers reads too."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        config = {
            "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
            "do_convert_rgb": True, "do_resize": True, "size": {"height": self.image_size, "width": self.image_size},
            "resample": self.resample, "do_rescale": True, "rescale_factor": self.rescale_factor,
            "do_normalize": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "image_seq_length": self.num_image_tokens,
        }
        (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"Processor(image_size={self.image_size}, num_image_tokens={self.num_image_tokens}, tokenizer={self.tokenizer!r})"


def _strings(values, what: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{what}s must be a str or a list of str, got {type(values).__name__}")
    if not values:
        raise UsageError(f"empty batch: no {what}s were given")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{what} {i} is a {type(v).__name__}, not a str")
    for i, v in enumerate(values):
        check_text(v, f"{what} {i}" if len(values) > 1 else f"the {what}")
    return list(values)


def _is_image(x) -> bool:
    return isinstance(x, _IMAGE_TYPES) or hasattr(x, "read")


def _images_per_prompt(images, num_prompts: int) -> list[list]:
    """Normalize `images` to one list of images per prompt, checking the counts."""
    if images is None:
        raise UsageError("no images were given; PaliGemma needs at least one image per prompt")
    if _is_image(images):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be an image, a list of images or a list of lists, got {type(images).__name__}")
    if not images:
        raise UsageError("empty batch: no images were given")
    nested = [isinstance(x, (list, tuple)) for x in images]
    if any(nested) and not all(nested):
        raise TypeError("images mixes single images and lists of images; use a list of lists for several images per prompt")
    per_prompt = [list(x) for x in images] if all(nested) else [[x] for x in images]
    if len(per_prompt) != num_prompts:
        noun = "image lists" if all(nested) else "images"
        hint = "" if all(nested) else "; for several images per prompt pass a list of lists"
        raise UsageError(f"got {len(per_prompt)} {noun} for {num_prompts} prompts; give one per prompt{hint}")
    for i, imgs in enumerate(per_prompt):
        if not imgs:
            raise UsageError(f"prompt {i} has an empty image list; PaliGemma needs at least one image per prompt")
        for j, img in enumerate(imgs):
            if not _is_image(img):
                raise TypeError(f"image {j} of prompt {i} is a {type(img).__name__}, not an image")
    return per_prompt


def image_settings(path: Path) -> tuple[dict, str | None]:
    """Constructor arguments from preprocessor_config.json and processor_config.json (flat or nested), and the file they came from."""
    pre = _read_json(path / "preprocessor_config.json")
    proc = _read_json(path / "processor_config.json")
    sources = [("preprocessor_config.json", pre), ("processor_config.json", proc.get("image_processor", {})),
               ("processor_config.json", proc)]
    merged, origin = {}, {}
    for name, d in sources:
        for key, value in d.items():
            if key not in _IMAGE_KEYS:
                continue
            if key in merged and merged[key] != value:
                raise UsageError(f"{path}: {origin[key]} and {name} disagree on {key} ({merged[key]!r} vs {value!r})")
            merged.setdefault(key, value)
            origin.setdefault(key, name)
    for flag, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True), ("do_center_crop", False), ("do_pad", False)):
        if merged.get(flag, want) not in (want, None):
            raise UsageError(f"{path}: {origin[flag]} sets {flag}={merged[flag]}; PaliGemma's preprocessing needs {flag}={want}")
    out = {}
    if "size" in merged:
        out["image_size"] = _square_size(merged["size"], f"{path}/{origin['size']}")
    if "image_seq_length" in merged:
        out["num_image_tokens"] = int(merged["image_seq_length"])
    for key, arg in (("image_mean", "image_mean"), ("image_std", "image_std"), ("rescale_factor", "rescale_factor"), ("resample", "resample")):
        if merged.get(key) is not None:
            out[arg] = merged[key]
    return out, origin.get("size") or origin.get("image_seq_length")


def _square_size(size, source: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise UsageError(f"{source}: size {size} is not square; PaliGemma resizes to a square")
        return int(size["height"])
    raise UsageError(f"{source}: size {size!r} is not supported; expected {{'height': S, 'width': S}}")


def _model_settings(path: Path) -> dict:
    """image_size, num_image_tokens and an explicitly written image token id from config.json, if there is one."""
    if not (path / "config.json").is_file():
        return {}
    from nanopali.config import PaliGemmaConfig

    cfg = PaliGemmaConfig.from_pretrained(path)
    out = {"image_size": cfg.vision_config.image_size, "num_image_tokens": cfg.num_image_tokens}
    raw = _read_json(path / "config.json")
    for key in ("image_token_index", "image_token_id"):
        if isinstance(raw.get(key), int):
            out["image_token_index"] = raw[key]
            break
    return out
