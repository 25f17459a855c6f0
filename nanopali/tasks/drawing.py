"""Draw parsed objects on the original image with Pillow: semi-transparent masks, box outlines, labels; PNG out.

`draw(image, objects)` takes anything `nanopali.images.load_image` takes and objects with `.box` (x0, y0,
x1, y1) pixels with exclusive ends, `.label`, and optionally `.score` and `.mask` (bool (H, W), the image's
size), as `parse_objects` returns them. Object i gets colour PALETTE[i % len(PALETTE)]: its mask is blended
at `alpha`, its box outline is drawn inside the box's pixels, and its label (with the score when set) sits
on a filled tag just above the box, or inside its top edge when the box touches the image top.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nanopali.errors import MissingFileError, UsageError
from nanopali.inputs.images import load_image

# Google's colours (the ones the PaliGemma Space uses) first, then more distinct hues.
PALETTE = [
    (66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (228, 142, 241),
    (0, 172, 193), (255, 112, 67), (158, 157, 36), (92, 107, 192), (240, 98, 146),
]


def label_text(obj) -> str:
    """"cat" or "cat 0.93" when the object has a score."""
    score = getattr(obj, "score", None)
    label = getattr(obj, "label", "") or ""
    return label if score is None else f"{label} {score:.2f}".strip()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _check_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"an object's box must be (x0, y0, x1, y1) pixels, got {box!r}") from None
    x0, x1 = max(0, min(x0, width)), max(0, min(x1, width))
    y0, y1 = max(0, min(y0, height)), max(0, min(y1, height))
    return x0, y0, x1, y1


def _blend_masks(rgb: np.ndarray, objects: Sequence, alpha: float) -> np.ndarray:
    """uint8 (H, W, 3) -> the same with each object's mask tinted by its colour."""
    out = rgb.astype(np.float32)
    for i, obj in enumerate(objects):
        mask = getattr(obj, "mask", None)
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"object {i} ({label_text(obj)!r}) has a mask of shape {mask.shape}, but the image "
                             f"is {rgb.shape[1]}x{rgb.shape[0]}, so it needs shape {rgb.shape[:2]}")
        m = mask.astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(PALETTE[i % len(PALETTE)], dtype=np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def check_output(path: str | Path, what: str = "the drawing") -> tuple[Path, str]:
    """Before any work is done: `path` and the Pillow format its suffix names, or a NanopaliError saying why
    an image cannot be written there (a directory, a missing or read-only folder, an unknown suffix)."""
    path = Path(path)
    where = f"cannot write {what} to {path}"
    if path.is_dir():
        raise UsageError(f"{where}: it is a directory; name an image file, e.g. {path / 'out.png'}")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        problem = (f"the suffix {path.suffix!r} is not an image format Pillow can write" if path.suffix
                   else "the name has no suffix to tell the image format")
        raise UsageError(f"{where}: {problem}; use .png (or .jpg, .webp, ...)")
    parent = path.parent
    if not parent.is_dir():
        raise MissingFileError(f"{where}: the folder {parent} does not exist" if not parent.exists()
                               else f"{where}: {parent} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{where}: the file exists and is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: the folder {parent} is not writable")
    return path, fmt


def draw(image, objects: Sequence, out_path: str | Path | None = None, alpha: float = 0.45,
         line_width: int | None = None) -> Image.Image:
    """Image + objects -> RGB PIL image with masks, boxes and labels drawn; also saved as PNG at out_path."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the mask opacity, in [0, 1]; got {alpha}")
    base = load_image(image)
    width, height = base.size
    canvas = Image.fromarray(_blend_masks(np.asarray(base), objects, alpha))
    pen = ImageDraw.Draw(canvas)
    lw = line_width or max(2, round(min(width, height) / 200))
    font = _font(max(12, min(width, height) // 30))
    for i, obj in enumerate(objects):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = _check_box(obj.box, width, height)
        if x1 <= x0 or y1 <= y0:
            continue
        pen.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=lw)
        text = label_text(obj)
        if not text:
            continue
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * lw, bottom - top + 2 * lw
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the image top
        tx = min(x0, max(0, width - tw))
        pen.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
        ink = (0, 0, 0) if sum(c * w for c, w in zip(colour, (0.299, 0.587, 0.114))) > 150 else (255, 255, 255)
        pen.text((tx + lw - left, ty + lw - top), text, fill=ink, font=font)
    if out_path is not None:
        out_path = Path(out_path)
        if not out_path.parent.is_dir():
            raise MissingFileError(f"cannot save the drawing to {out_path}: {out_path.parent} is not a directory")
        canvas.save(out_path, format="PNG")
    return canvas
