"""Images in, pixel values out: load any image input as RGB, then resize and normalize as SigLIP expects.

`load_image` accepts a path (str or Path), bytes, a binary file object, a PIL image, a numpy array
(HWC; CHW and 2-D grayscale are recognised too) or a torch tensor (CHW; HWC recognised), and returns
an RGB PIL image, or raises an `ImageError` that says what is wrong with which input.

Conversion to RGB is transformers' (`image_transforms.convert_to_rgb`, used by SiglipImageProcessor):
a PIL image with an alpha band or a `transparency` entry (RGBA, LA, P with transparency…) is
alpha-composited onto white; any other 8-bit mode (L, 1, CMYK, YCbCr…) goes through
`Image.convert("RGB")`; a 4-channel array is blended onto white as `round(a*rgb + (1-a)*255)`.

Pixel values are read by the range their type implies, the same way however the pixels arrive (PIL image,
file, numpy array, torch tensor), as an image viewer shows them:
- 8-bit (uint8, PIL's 8-bit modes): as they are. bool: 0 / 255.
- 16-bit (uint16 arrays and tensors, PIL modes I;16, I;16B, I;16L, I;16N, a 16-bit PNG however PIL opens it):
  0..65535, shown as `v >> 8` (the high byte, what PIL itself does with 16-bit RGB PNGs; 257*x gives back x).
- Other integers (int8..int64, uint32, uint64, PIL mode I = int32, e.g. a 32-bit TIFF): no bit depth is implied,
  so only values 0..255 are taken (as 8-bit); anything else is an ImageError (pass 16-bit data as uint16).
- Float (float16/32/64 arrays and tensors, bfloat16 tensors, PIL mode F, e.g. a float TIFF): values in [0, 1],
  shown as `round(v * 255)`; NaN, infinity or anything outside [0, 1] is an ImageError naming the range found.
Transformers instead clips I;16 / I / F through `convert("RGB")` (a 16-bit image turns white, a [0, 1] float
image black); nanopali deliberately differs there and matches it everywhere else.
Files and bytes are turned upright with their EXIF orientation, as transformers does when it loads a
path; PIL images and arrays are taken as they are.

`preprocess` then matches transformers' SiglipImageProcessor (PIL backend) to the bit: PIL resize of the
uint8 RGB image to (size, size) (bicubic by default; no crop, aspect ratio not kept), then
`float32(float64(x) * 1/255)`, then `(x - mean) / std` in float32, channels first.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nanopali.errors import ImageError, ImageNotFoundError, ImageTooLargeError

# PIL's own default for Image.MAX_IMAGE_PIXELS (about 89.5 megapixels, a 1 GB RGBA image).
DEFAULT_MAX_PIXELS = 89_478_485
_CHANNELS = (1, 3, 4)


def load_image(image, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any supported image input -> RGB PIL image. `max_pixels=None` disables the size limit."""
    if isinstance(image, Image.Image):
        _check_size(image.size, max_pixels, "image")
        try:
            image.load()  # a lazily opened file decodes here; catch truncation now rather than in resize
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"the image could not be decoded; the file is truncated or corrupt ({e})") from None
        return to_rgb(image)
    if isinstance(image, (str, Path)):
        return _open(_read_path(image), str(image), max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open(bytes(image), f"{len(image)} bytes", max_pixels)
    if hasattr(image, "read"):
        return _open(image.read(), "the file object", max_pixels)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float() if image.is_floating_point() else image  # numpy has no bfloat16
        return _from_array(image.numpy(), max_pixels, channels_first=True)
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels, channels_first=False)
    raise ImageError(
        f"cannot use a {type(image).__name__} as an image; pass a path, bytes, a PIL image, "
        "a numpy HWC uint8 array or a CHW torch tensor"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """PIL image of any mode -> RGB, transparency composited onto white (transformers' convert_to_rgb);
    16-bit, 32-bit integer and float modes are scaled by the rules in the module docstring."""
    return _to_rgb(image, image.format)


_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # 16 bits per pixel, unsigned


def _to_rgb(image: Image.Image, file_format: str | None) -> Image.Image:
    if image.mode in _WIDE_MODES or image.mode in ("I", "F"):
        array = np.asarray(image)
        if image.mode == "I" and file_format == "PNG":  # a 16-bit grayscale PNG (older Pillow opens it as I)
            array = array.astype(np.uint16)
        gray = _to_uint8(array, f"mode {image.mode} image")
        transparent = image.info.get("transparency")  # a 16-bit PNG's tRNS: one gray value that is see-through
        if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
            gray = np.where(np.asarray(image) == transparent, np.uint8(255), gray)  # composited onto white
        return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pixel_values(
    image: Image.Image,
    size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    rescale_factor: float = 1 / 255,
    resample: int = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """RGB PIL image -> float32[3, size, size]: resize, rescale, normalize (SiglipImageProcessor's order and dtypes)."""
    if image.mode != "RGB":
        raise ImageError(f"pixel_values takes an RGB image, got mode {image.mode}; use load_image first")
    resized = image.resize((size, size), resample=resample)  # PIL takes (width, height)
    x = (np.asarray(resized).astype(np.float64) * rescale_factor).astype(np.float32)  # (S, S, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess(images: Iterable, size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS, **kwargs) -> torch.Tensor:
    """Images of any supported kind -> float32[N, 3, size, size]. `kwargs` go to `pixel_values`."""
    arrays = []
    for n, image in enumerate(images):
        try:
            arrays.append(pixel_values(load_image(image, max_pixels=max_pixels), size, **kwargs))
        except ImageError as e:
            raise type(e)(f"image {n}: {e}") from e
    if not arrays:
        raise ImageError("no images to preprocess")
    return torch.from_numpy(np.stack(arrays))


# ---------------------------------------------------------------------- files and bytes


def _read_path(path: str | Path) -> bytes:
    text = str(path)
    if text.startswith(("http://", "https://")):
        raise ImageError(f"{text}: nanopali does not download images; fetch the file first and pass its path or bytes")
    path = Path(path).expanduser()
    if not path.exists():
        raise ImageNotFoundError(f"image file {path} does not exist")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    return path.read_bytes()


def _open(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    if not data:
        raise ImageError(f"{name}: the file is empty, not an image")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}; raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels to allow it") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from None
    _check_size(image.size, max_pixels, name)
    try:
        image.load()
        file_format = image.format
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: the image could not be decoded; the file is truncated or corrupt ({e})") from None
    try:
        return _to_rgb(image, file_format)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None


def _check_size(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: the image is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
            "(a decompression bomb guard); pass a larger max_pixels to allow it"
        )


# ---------------------------------------------------------------------- arrays and tensors


def _from_array(array: np.ndarray, max_pixels: int | None, channels_first: bool) -> Image.Image:
    """uint8 / uint16 / [0, 1] float array -> RGB PIL image (module docstring). `channels_first`: which layout wins when both fit (torch: CHW)."""
    kind = "tensor" if channels_first else "array"
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ImageError(f"an image {kind} must have 2 or 3 dimensions (HWC or CHW), got shape {tuple(array.shape)}")
    first, last = array.shape[0] in _CHANNELS, array.shape[-1] in _CHANNELS
    if first and (channels_first or not last):
        array = array.transpose(1, 2, 0)
    elif not last:
        raise ImageError(f"image {kind} of shape {tuple(array.shape)} has no channel axis of size 1, 3 or 4")
    _check_size((array.shape[1], array.shape[0]), max_pixels, f"image {kind}")
    array = _to_uint8(array, f"image {kind}")
    if array.shape[-1] == 4:  # transformers' numpy path: blend onto white, rounding half to even
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    elif array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array))


def _to_uint8(array: np.ndarray, kind: str) -> np.ndarray:
    """Pixel values of any supported dtype -> uint8, by the range the dtype implies (module docstring)."""
    if array.dtype.kind == "u" and array.dtype.itemsize == 1:
        return array.astype(np.uint8, copy=False)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # 16-bit: 0..65535, the high byte
        return (array.astype(np.uint16, copy=False) >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise ImageError(
                f"{kind} of {array.dtype} has values in [{low}, {high}]; expected 0..255 (uint8), as {array.dtype} "
                "implies no bit depth; pass 16-bit pixels as uint16 (0..65535) or float pixels in [0, 1]"
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            finite = array[np.isfinite(array)]
            found = f"[{finite.min()}, {finite.max()}]" if finite.size else "no finite values"
            if finite.size < array.size:
                found += f" and {array.size - finite.size} NaN or infinite values"
            raise ImageError(
                f"float {kind} has values in {found}; float images must be in [0, 1] "
                "(divide 0..255 values by 255, or pass uint8 values 0..255)"
            )
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    raise ImageError(f"{kind} has dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]")
