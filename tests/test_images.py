"""nanopali.images against transformers' SiglipImageProcessor (PIL backend), on real photographs in every
image mode, and one test per kind of bad input.

The photographs ship inside scikit-image's wheel (astronaut, chelsea, coffee, camera, rocket, the Hubble
deep field, the scikit-image logo with its alpha channel, a palette GIF).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from nanopali.inputs.images import (
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    load_image,
    pixel_values,
    preprocess,
    to_rgb,
)

skimage_data = pytest.importorskip("skimage.data")
DATA = Path(skimage_data.__file__).parent
FILES = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg", "hubble_deep_field.jpg",
         "logo.png", "no_time_for_that_tiny.gif"]
SIZE = 224


@pytest.fixture(scope="module")
def reference():
    """transformers' image processor, configured as PaliGemma's preprocessor_config.json configures it."""
    from transformers import SiglipImageProcessorPil

    ref = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, resample=3, rescale_factor=1 / 255,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return lambda image: ref(images=[image], return_tensors="pt")["pixel_values"][0]


def ours(image, **kwargs) -> torch.Tensor:
    return preprocess([image], SIZE, **kwargs)[0]


def _photo(name: str) -> Image.Image:
    with Image.open(DATA / name) as f:
        return ImageOps.exif_transpose(f)


def _modes(photo: Image.Image) -> dict[str, Image.Image]:
    """The photo in each 8-bit mode PIL can hold it in (and I, 32-bit integer, with values 0..255), with partial
    transparency where the mode has any. The 16-bit and float modes are read differently from transformers on
    purpose: test_sixteen_bit_and_float_pixels_arrive_the_same_every_way."""
    rgb = to_rgb(photo)
    w, h = rgb.size
    alpha = Image.fromarray((np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w)).astype(np.uint8))  # a diagonal ramp
    rgba, la = rgb.copy(), rgb.convert("L")
    rgba.putalpha(alpha)
    la.putalpha(alpha)
    png = io.BytesIO()
    rgb.quantize(64).save(png, format="PNG", transparency=5)
    return {
        "original": photo, "RGB": rgb, "RGBA": rgba, "LA": la, "L": rgb.convert("L"), "P": rgb.quantize(64),
        "P+transparency": Image.open(io.BytesIO(png.getvalue())), "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"), "I": rgb.convert("I"),
    }


@pytest.mark.parametrize("name", FILES)
def test_photographs_in_every_mode_match_transformers(name, reference):
    for mode, image in _modes(_photo(name)).items():
        want = reference(image)
        got = ours(image)
        assert got.dtype == torch.float32 and got.shape == (3, SIZE, SIZE)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), f"{name} as {mode}: max diff {(got - want).abs().max()}"


@pytest.mark.parametrize("name", ["astronaut.png", "rocket.jpg", "logo.png", "no_time_for_that_tiny.gif"])
def test_paths_and_bytes_decode_like_transformers(name, reference):
    """A path or bytes gives the same pixels as transformers fed the opened, EXIF-upright file."""
    want = reference(_photo(name))
    for source in (DATA / name, str(DATA / name), (DATA / name).read_bytes(), io.BytesIO((DATA / name).read_bytes())):
        assert torch.allclose(ours(source), want, rtol=0, atol=1e-6), type(source).__name__


def test_arrays_and_tensors_match_transformers(reference):
    rgb = np.array(_photo("chelsea.png"))  # (300, 451, 3) uint8
    alpha = (np.arange(rgb.shape[1]) * 255 // rgb.shape[1]).astype(np.uint8)[None, :, None].repeat(rgb.shape[0], 0)
    rgba = np.concatenate([rgb, alpha], axis=-1)
    gray = rgb[..., :1]
    for name, array in (("HWC", rgb), ("HWC RGBA", rgba), ("HWC gray", gray)):
        want = reference(array)
        assert torch.allclose(ours(array), want, rtol=0, atol=1e-6), f"numpy {name}"
        assert torch.allclose(ours(torch.from_numpy(array)), want, rtol=0, atol=1e-6), f"torch {name}"
        chw = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        assert torch.allclose(ours(chw), reference(chw), rtol=0, atol=1e-6), f"torch CHW from {name}"


def test_other_array_kinds():
    rgb = np.array(_photo("coffee.png"))
    base = ours(rgb)
    assert torch.equal(ours(rgb.astype(np.float32) / 255), base), "float in [0, 1] is value / 255"
    assert torch.equal(ours(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255), base)
    assert torch.equal(ours(rgb.astype(np.int64)), base), "integers in 0..255"
    assert torch.equal(ours(np.asarray(_photo("camera.png"))), ours(_photo("camera.png"))), "2-D grayscale array"
    # Layout: numpy prefers HWC, torch prefers CHW, when both axes could hold channels.
    tiny = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3)
    assert load_image(tiny).size == (4, 3)
    assert load_image(torch.from_numpy(tiny)).size == (3, 4)


def _png16(gray16: np.ndarray, rgb: bool = False) -> bytes:
    """A 16-bit grayscale (or, with `rgb`, 16-bit RGB: gray in all three channels) PNG, written by hand (PIL writes no
    16-bit RGB PNG)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = gray16.shape
    pixels = np.repeat(gray16[..., None], 3, -1) if rgb else gray16
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if rgb else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_sixteen_bit_and_float_pixels_arrive_the_same_every_way(tmp_path):
    """A 16-bit picture gives the same pixel values as a PNG file (gray or RGB), a PIL I;16 / I;16B image, a uint16
    array or tensor (v >> 8, as PIL reads 16-bit RGB PNGs); within one level of its 8-bit version, and exactly that
    for 257 * x. Float pixels in [0, 1] (PIL F, numpy, torch) are round(v * 255)."""
    rng = np.random.default_rng(0)
    gray16 = (np.add.outer(np.arange(40), np.arange(50)) * 700 + rng.integers(0, 300, (40, 50))).astype(np.uint16)
    file = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(file)
    assert Image.open(file).mode == "I;16"
    big_endian = Image.frombytes("I;16B", (50, 40), gray16.astype(">u2").tobytes())
    ways = {"png file": file, "png bytes": file.read_bytes(), "16-bit RGB png": _png16(gray16, rgb=True),
            "hand-written gray png": _png16(gray16), "PIL I;16": Image.fromarray(gray16), "PIL I;16B": big_endian,
            "numpy uint16": gray16, "numpy uint16 RGB": np.repeat(gray16[..., None], 3, -1),
            "torch uint16": torch.from_numpy(gray16)[None]}
    base = ours(gray16)
    for name, image in ways.items():
        assert torch.equal(ours(image), base), name
    eight = (gray16 >> 8).astype(np.uint8)
    assert torch.equal(base, ours(eight)), "the high byte"
    rounded = np.round(gray16 / 257).astype(np.uint8)
    got = np.asarray(load_image(gray16))[..., 0].astype(int)
    assert np.abs(got - rounded).max() <= 1, "within one level of the rounded 8-bit picture"
    assert torch.equal(ours(eight.astype(np.uint16) * 257), ours(eight)), "257 * x is x"
    # Float pixels in [0, 1]: PIL F (a float TIFF), numpy float32 / float64, torch float and bfloat16 agree.
    gray = np.asarray(_photo("camera.png"))
    unit = gray.astype(np.float32) / 255
    tiff = io.BytesIO()
    Image.fromarray(unit).save(tiff, format="TIFF")
    for name, image in {"PIL F": Image.fromarray(unit), "float TIFF": tiff.getvalue(), "numpy float32": unit,
                        "numpy float64": unit.astype(np.float64), "torch float": torch.from_numpy(unit)[None]}.items():
        assert torch.equal(ours(image), ours(gray)), name


@pytest.mark.parametrize("image, message", [
    (Image.fromarray(np.full((8, 8), 200.0, np.float32)), r"mode F image has values in \[200.0, 200.0\]; float images must be in \[0, 1\]"),
    (np.full((8, 8), 200.0, np.float32), r"values in \[200.0, 200.0\]; float images must be in \[0, 1\]"),
    (torch.full((1, 8, 8), -0.5), r"values in \[-0.5, -0.5\]"),
    (np.array([[np.nan, 0.5]], np.float32), r"\[0.5, 0.5\] and 1 NaN or infinite values"),
    (Image.fromarray(np.full((8, 8), 40_000, np.int32)), r"mode I image of int32 has values in \[40000, 40000\].*uint16"),
    (np.full((8, 8), 40_000, np.int32), r"int32 has values in \[40000, 40000\]; expected 0..255"),
    (torch.full((1, 8, 8), 300, dtype=torch.int64), "int64 has values in"),
], ids=["PIL F 0..255", "numpy float 0..255", "torch float negative", "NaN", "PIL I 32-bit", "numpy int32", "torch int64"])
def test_pixels_outside_their_range_are_refused(image, message):
    with pytest.raises(ImageError, match=message):
        load_image(image)


def test_exif_orientation_of_files_is_applied():
    image = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (10, 30)


def test_pixel_values_layout():
    x = pixel_values(Image.new("RGB", (5, 7), (255, 0, 128)), 4)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x[:, 0, 0], [1.0, -1.0, 128 / 255 * 2 - 1], atol=1e-6)
    with pytest.raises(ImageError, match="RGB image"):
        pixel_values(Image.new("L", (4, 4)), 4)


# ---------------------------------------------------------------------- one test per bad input


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="does not exist") as info:
        load_image(tmp_path / "nope.jpg")
    assert isinstance(info.value, FileNotFoundError) and "nope.jpg" in str(info.value)


def test_a_directory(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_a_file_that_is_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels")
    with pytest.raises(ImageError, match="not an image file") as info:
        load_image(tmp_path / "notes.jpg")
    assert "notes.jpg" in str(info.value)


def test_an_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")


@pytest.mark.parametrize("name", ["hubble_deep_field.jpg", "astronaut.png"])
def test_a_truncated_file(name, tmp_path):
    data = (DATA / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        load_image(tmp_path / name)
    assert name in str(info.value)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(Image.open(tmp_path / name))  # opened lazily by the caller, decoded by us


def test_a_zero_sized_image():
    for empty in (Image.new("RGB", (0, 5)), np.zeros((0, 10, 3), np.uint8), torch.zeros(3, 0, 0, dtype=torch.uint8)):
        with pytest.raises(ImageError, match="empty"):
            load_image(empty)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit():
    with pytest.raises(ImageTooLargeError, match="over the limit of 89478485"):
        load_image(_png_header_only(12_000, 8_000))  # 96 megapixels, refused before decoding
    with pytest.raises(ImageTooLargeError, match="12000x8000"):
        load_image(_png_header_only(12_000, 8_000), max_pixels=50_000_000)
    with pytest.raises(ImageTooLargeError, match="PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(_png_header_only(100_000, 100_000), max_pixels=None)  # past PIL's own hard limit
    astronaut = DATA / "astronaut.png"
    assert load_image(astronaut, max_pixels=512 * 512).size == (512, 512)
    for image in (astronaut, _photo("astronaut.png"), np.asarray(_photo("astronaut.png"))):
        with pytest.raises(ImageTooLargeError, match="pass a larger max_pixels"):
            load_image(image, max_pixels=512 * 512 - 1)


def test_a_url_is_not_fetched():
    with pytest.raises(ImageError, match="does not download"):
        load_image("https://example.com/cat.jpg")


def test_unsupported_objects_and_arrays():
    with pytest.raises(ImageError, match="cannot use a int as an image"):
        load_image(42)
    with pytest.raises(ImageError, match="2 or 3 dimensions"):
        load_image(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ImageError, match="no channel axis"):
        load_image(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ImageError, match=r"float images must be in \[0, 1\]"):
        load_image(np.full((8, 8, 3), 2.5, np.float32))
    with pytest.raises(ImageError, match="expected 0..255"):
        load_image(np.full((8, 8, 3), 300, np.int32))
    with pytest.raises(ImageError, match="dtype complex64"):
        load_image(np.zeros((8, 8, 3), np.complex64))


def test_preprocess_names_the_bad_image(tmp_path):
    with pytest.raises(ImageNotFoundError, match="image 1: image file .* does not exist"):
        preprocess([DATA / "astronaut.png", tmp_path / "missing.png"], 16)
    with pytest.raises(ImageError, match="no images"):
        preprocess([], 16)
