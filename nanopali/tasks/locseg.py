"""Detection and segmentation answers as text: parse `<locNNNN>`/`<segNNN>` strings into objects, encode them back.

PaliGemma answers "detect cat ; dog" and "segment cat" with objects separated by " ; ", each

    <loc{ymin}><loc{xmin}><loc{ymax}><loc{xmax}>[<seg{s0}> ... <seg{s15}>] label

where locs are 0..1023 bins of the normalized box, seg tokens are 16 codebook indices of the mask VQ-VAE
(vqvae.py), and the label may contain spaces. Two conventions turn loc bins into boxes:

    "bigvision" (default)  norm = loc / 1023, px = int(norm * size) (truncation); big_vision's evaluators.
                           Encoding (refcoco_mask2str) is loc = clip(round(norm * 1023), 0, 1023) in float32.
    "hfspace"              norm = loc / 1024, px = round(norm * size) (half to even); Google's Hugging Face
                           Space `big-vision/paligemma` (`paligemma_parse.extract_objs`).

Pixel boxes are (x0, y0, x1, y1) with exclusive ends (`mask[y0:y1, x0:x1]`); normalized boxes keep the
model's order (ymin, xmin, ymax, xmax).

Parsing rules. big_vision has no string parser: its segmentation evaluator reads the first 20 token ids of
the answer (4 locs then 16 segs, nothing between them) and ignores the rest. `parse_objects` applies that
per object to every object of the string, and, like the Space's regex, tolerates whitespace between tokens
and objects without seg tokens (detection). An object starts at a `<loc>` token that follows a `;`, the
start of the text, or a label/seg token, so a missing " ; " still separates objects. Labels are stripped
(the Space keeps a trailing space: "cat "). An object is dropped, never raised on, when it has not exactly
4 locs, has 1..15 or more than 16 segs, has tokens after its label, a malformed or out-of-range token,
ymax <= ymin or xmax <= xmin (in bins, as big_vision) or a box that is empty in pixels. Text with no loc
token at all is dropped too. Dropped pieces are in the result's `.dropped`, as (text, reason, span).
Unlike the Space, which keeps a box with ymax < ymin, such an object is dropped here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from nanopali.tasks.vqvae import NUM_TOKENS, crop_to_64, paste_mask

NUM_LOCS = 1024
_TOKEN = re.compile(r"<(loc|seg)([0-9]+)>")
_TOKEN_RULES = {"loc": (4, NUM_LOCS), "seg": (3, 128)}  # digits, number of values


@dataclass(frozen=True)
class Convention:
    """How loc bins become normalized coordinates (`loc / scale`) and pixels (`to_px(norm * size)`)."""

    name: str
    scale: int
    to_px: Callable[[float], int]


CONVENTIONS = {
    "bigvision": Convention("bigvision", 1023, int),
    "hfspace": Convention("hfspace", 1024, round),
}


@dataclass
class DetectedObject:
    """One parsed object. `score` is left to the caller (geometric mean of the span's token probabilities)."""

    label: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1 and y1 exclusive
    box_normalized: tuple[float, float, float, float]  # (ymin, xmin, ymax, xmax) in [0, 1]
    locs: tuple[int, int, int, int]  # the four loc bins, (ymin, xmin, ymax, xmax)
    seg: list[int] | None = None  # 16 VQ-VAE indices, or None for a detection
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # bool (H, W), with seg and a VAE
    span: tuple[int, int] = (0, 0)  # text[start:end] is the object, first <loc> to end of label
    score: float | None = None


class DroppedObject(NamedTuple):
    """A piece of the text that is not a valid object, and why."""

    text: str
    reason: str
    span: tuple[int, int]


class ParsedObjects(list):
    """A list of DetectedObject, with `.dropped`: the DroppedObjects, in text order."""

    def __init__(self, objects: Sequence[DetectedObject] = (), dropped: Sequence[DroppedObject] = ()):
        super().__init__(objects)
        self.dropped = list(dropped)


class _Piece(NamedTuple):
    kind: str  # "loc", "seg" or "text"
    text: str
    start: int
    end: int


def get_convention(name: str) -> Convention:
    """The Convention called `name`, or an error listing the valid names."""
    if name not in CONVENTIONS:
        raise ValueError(f"unknown box convention {name!r}; valid: {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


def _pieces(text: str, start: int, end: int) -> list[_Piece]:
    """text[start:end] -> its loc/seg tokens and the non-blank text between them (stripped), in order."""
    out, pos = [], start
    for m in list(_TOKEN.finditer(text, start, end)) + [None]:
        gap_end = m.start() if m else end
        gap = text[pos:gap_end]
        if gap.strip():
            s = pos + len(gap) - len(gap.lstrip())
            out.append(_Piece("text", gap.strip(), s, s + len(gap.strip())))
        if m:
            out.append(_Piece(m.group(1), m.group(0), m.start(), m.end()))
            pos = m.end()
    return out


def _groups(text: str) -> list[list[_Piece]]:
    """Split at ';' and at every <loc> that follows something other than a <loc>: one group per object."""
    groups, start = [], 0
    for stop in [m.start() for m in re.finditer(";", text)] + [len(text)]:
        current: list[_Piece] = []
        for piece in _pieces(text, start, stop):
            if piece.kind == "loc" and current and current[-1].kind != "loc":
                groups.append(current)
                current = []
            current.append(piece)
        if current:
            groups.append(current)
        start = stop + 1
    return groups


def _token_value(piece: _Piece) -> int | str:
    """The integer of a loc/seg token, or the reason it is malformed."""
    digits, count = _TOKEN_RULES[piece.kind]
    number = piece.text[4:-1]
    if len(number) != digits or int(number) >= count:
        return f"malformed token {piece.text} (expected {digits} digits, 0..{count - 1})"
    return int(number)


def _parse_group(group: list[_Piece], width: int, height: int, conv: Convention) -> DetectedObject | str:
    """One object's pieces -> the object, or the reason it is dropped."""
    kinds = [p.kind for p in group]
    n_locs = next((i for i, k in enumerate(kinds) if k != "loc"), len(kinds))
    if n_locs == 0:
        return "no <loc> tokens"
    if n_locs != 4:
        return f"expected 4 <loc> tokens, found {n_locs}"
    n_segs = next((i for i, k in enumerate(kinds[4:]) if k != "seg"), len(kinds) - 4)
    if n_segs not in (0, NUM_TOKENS):
        return f"expected 0 or {NUM_TOKENS} <seg> tokens after the <loc> tokens, found {n_segs}"
    rest = group[4 + n_segs:]
    if any(p.kind != "text" for p in rest):
        return f"unexpected {next(p.text for p in rest if p.kind != 'text')} after the label"
    values = [_token_value(p) for p in group[:4 + n_segs]]
    if bad := next((v for v in values if isinstance(v, str)), None):
        return bad
    locs = tuple(values[:4])
    if locs[2] <= locs[0] or locs[3] <= locs[1]:
        return f"degenerate box: locs (ymin, xmin, ymax, xmax) = {locs} need ymax > ymin and xmax > xmin"
    norm = tuple(v / conv.scale for v in locs)
    y0, x0, y1, x1 = (conv.to_px(n * s) for n, s in zip(norm, (height, width, height, width)))
    if y1 <= y0 or x1 <= x0:
        return f"box {(x0, y0, x1, y1)} is empty at {width}x{height} pixels"
    label = rest[0].text if rest else ""
    return DetectedObject(label=label, box=(x0, y0, x1, y1), box_normalized=norm, locs=locs,
                          seg=list(values[4:]) if n_segs else None, span=(group[0].start, group[-1].end))


def parse_objects(text: str, image_size: tuple[int, int], vae=None, convention: str = "bigvision") -> ParsedObjects:
    """Model answer -> ParsedObjects (a list of DetectedObject, `.dropped` for the rest). Never raises on text.

    image_size is (W, H) of the original image. With a SegmentationVAE, objects with seg tokens get a bool
    (H, W) `.mask`: the 64x64 logits pasted into `.box` and thresholded at > 0, as big_vision does.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_objects takes the decoded answer as a str, got {type(text).__name__}")
    width, height = _image_size(image_size)
    conv = get_convention(convention)
    result = ParsedObjects()
    for group in _groups(text):
        parsed = _parse_group(group, width, height, conv)
        if isinstance(parsed, str):
            span = (group[0].start, group[-1].end)
            result.dropped.append(DroppedObject(text[span[0]:span[1]], parsed, span))
        else:
            result.append(parsed)
    with_seg = [o for o in result if o.seg is not None]
    if vae is not None and with_seg:
        logits = vae.decode(torch.tensor([o.seg for o in with_seg]))  # (N, 64, 64)
        for obj, m64 in zip(with_seg, logits):
            obj.mask = paste_mask(m64, obj.box, (height, width))
    return result


def _image_size(image_size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size (width, height) must be positive, got {image_size!r}")
    return width, height


def _check_finite(box, what: str) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,) or not np.isfinite(b).all():
        raise ValueError(f"{what} must be 4 finite numbers, got {box!r}")
    return b


def box_to_locs(box, image_size: tuple[int, int] | None = None, convention: str = "bigvision") -> tuple[int, ...]:
    """A box -> its four loc bins (ymin, xmin, ymax, xmax). See `encode_box` for the two kinds of box."""
    conv = get_convention(convention)
    if image_size is None:  # normalized (ymin, xmin, ymax, xmax): big_vision's float32 round, half to even
        b = _check_finite(box, "a normalized box (ymin, xmin, ymax, xmax)")
        if b[2] <= b[0] or b[3] <= b[1]:
            raise ValueError(f"normalized box {tuple(box)} needs ymax > ymin and xmax > xmin; the order is "
                             "(ymin, xmin, ymax, xmax); pass image_size for a pixel box (x0, y0, x1, y1)")
        locs = np.clip(np.round(b.astype(np.float32) * np.float32(conv.scale)), 0, NUM_LOCS - 1)
        return tuple(int(v) for v in locs)
    width, height = _image_size(image_size)
    x0, y0, x1, y1 = np.clip(_check_finite(box, "a pixel box (x0, y0, x1, y1)"), 0, [width, height] * 2)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"pixel box {tuple(box)} is empty inside the {width}x{height} image")
    return tuple(_px_to_loc(px, size, conv) for px, size in ((y0, height), (x0, width), (y1, height), (x1, width)))


def _px_to_loc(px: float, size: int, conv: Convention) -> int:
    """The bin whose decoded pixel is nearest `px` (exact whenever size <= 1023), ties to the nearer bin."""
    guess = px / size * conv.scale
    candidates = range(max(0, math.floor(guess) - 2), min(NUM_LOCS, math.floor(guess) + 4))
    return min(candidates, key=lambda k: (abs(conv.to_px(k / conv.scale * size) - px), abs(k - guess)))


def encode_box(box, image_size: tuple[int, int] | None = None, convention: str = "bigvision") -> str:
    """A box -> "<locYMIN><locXMIN><locYMAX><locXMAX>", the inverse of parsing within one bin.

    Without image_size, `box` is normalized (ymin, xmin, ymax, xmax) (an object's `.box_normalized`) and is
    encoded as big_vision's refcoco_mask2str does: parsing gives it back within half a bin. With image_size
    = (W, H), `box` is (x0, y0, x1, y1) pixels (an object's `.box`); each coordinate gets the bin that
    parses back to the nearest pixel, so parsing gives the box back exactly when the side is <= 1023 px,
    else within one bin (size / 1023 px). Under "hfspace", loc / 1024 never reaches 1: the far edge
    x1 = W (y1 = H) comes back as W - 1 once W > 512. Out-of-image pixel boxes are clipped to the image.
    """
    return "".join(f"<loc{k:04d}>" for k in box_to_locs(box, image_size, convention))


def encode_segmentation(mask, box_normalized, vae) -> str:
    """Full (H, W) mask + its normalized box -> "<loc>x4<seg>x16", big_vision's refcoco_mask2str target.

    The mask is cropped at round-half-even(size * coordinate), resized to 64x64 (antialiased bilinear) and
    encoded by the VAE; the locs are `encode_box(box_normalized)`.
    """
    if vae is None:
        raise ValueError("encode_segmentation needs the mask VQ-VAE (SegmentationVAE.from_npz('vae-oid.npz'))")
    locs = encode_box(box_normalized)
    indices = vae.encode(torch.from_numpy(crop_to_64(mask, box_normalized))[None])[0]  # (16,)
    return locs + "".join(f"<seg{int(i):03d}>" for i in indices)
