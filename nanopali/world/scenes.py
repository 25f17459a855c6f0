"""A seeded toy visual world: scenes of shapes, colours and an optional word, drawn with their masks.

    scene = make_scene(scene_rng(seed=2, i=7))      # PIL image + objects with boxes and visible masks
    labels = patch_labels(scene, grid=8)             # which shape / colour / word covers each patch

A scene has 1-4 objects (SHAPES x COLORS, various sizes and positions) drawn with Pillow on a plain,
gradient or noise background whose colours stay far (RGB distance) from every object colour, and maybe
a WORDS entry rendered with Pillow's default font. Objects overlap little: each keeps >= 90 % of its
pixels visible; `Object.mask` is what is visible after the later objects are drawn and `Object.box` is
its tight box, (x0, y0, x1, y1) pixels with exclusive ends. The text side (captions, questions, detect,
segment and ocr examples in PaliGemma syntax) is world/examples.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
COLORS = {  # name -> RGB; each object gets this colour jittered by at most COLOR_JITTER per channel
    "red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (245, 220, 40), "green": (40, 160, 60),
    "blue": (40, 80, 215), "purple": (135, 50, 185), "white": (250, 250, 250), "black": (15, 15, 15),
}
WORDS = ("cat", "dog", "sun", "moon", "tree", "car", "fish", "bird", "boat", "cake", "door", "frog",
         "hat", "key", "lamp", "milk", "nest", "pen", "rain", "ship", "toy", "wind", "book", "cup")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
BACKGROUNDS = ("plain", "gradient", "noise")
COLOR_JITTER = 12
BACKGROUND_MARGIN = 110  # min RGB distance of a background base colour to every COLORS entry
NOISE = 12               # noise backgrounds add uniform noise in [-NOISE, NOISE] per channel
MIN_VISIBLE = 0.9        # fraction of each object's pixels left visible by the objects drawn after it


@dataclass
class Object:
    shape: str
    color: str
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels of the visible mask, x1 and y1 exclusive
    mask: np.ndarray = field(repr=False)  # bool (H, W), the visible pixels

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    image: Image.Image
    objects: list[Object]
    word: str | None = None
    word_box: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of the rendered word
    background: str = "plain"

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def scene_rng(seed: int, i: int) -> random.Random:
    """The generator of scene i of a world seed, and then of its examples: every data set, evaluation and
    example image draws scene i this way, so a seed never used for training is a held-out set."""
    return random.Random(f"world:{seed}:{i}")


def as_random(rng) -> random.Random:
    """A random.Random from a random.Random (used as is), a numpy Generator or an int seed."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"rng must be a random.Random, numpy Generator or int seed, got {type(rng).__name__}")


# ---- drawing -------------------------------------------------------------------------------------------

def _regular(cx: float, cy: float, r: float, n: int, start: float, inner: float | None = None) -> list:
    """Vertices of a regular n-gon (or an n-pointed star with inner radius `inner * r`), from angle `start`."""
    points = []
    for k in range(n * (2 if inner else 1)):
        radius = r * inner if inner and k % 2 else r
        a = start + k * math.pi / (n if inner else n / 2)
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    up = -math.pi / 2
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "star":
        pen.polygon(_regular(cx, cy, r, 5, up, inner=0.45), fill=255)
    elif shape == "diamond":
        pen.polygon(_regular(cx, cy, r, 4, up), fill=255)
    elif shape == "hexagon":
        pen.polygon(_regular(cx, cy, r, 6, 0.0), fill=255)
    elif shape == "cross":
        w = 0.35 * r
        pen.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
        pen.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; the shapes are {SHAPES}")


def shape_mask(shape: str, size: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    """Bool (H, W) mask of one shape of half-size r centred at (cx, cy)."""
    canvas = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r)
    return np.asarray(canvas) > 127


def _far_from_objects(rgb) -> bool:
    return all(math.dist(rgb, c) >= BACKGROUND_MARGIN for c in COLORS.values())


def _background_color(r: random.Random) -> tuple[int, int, int]:
    while True:
        gray = r.randint(60, 200)
        rgb = tuple(min(255, max(0, gray + r.randint(-40, 40))) for _ in range(3))
        if _far_from_objects(rgb):
            return rgb


def _background(r: random.Random, size: tuple[int, int]) -> tuple[str, np.ndarray]:
    """(kind, uint8 (H, W, 3)): plain, a linear gradient between two far colours, or plain + noise."""
    width, height = size
    kind = r.choice(BACKGROUNDS)
    a = np.array(_background_color(r), dtype=np.float64)
    if kind == "plain":
        pixels = np.broadcast_to(a, (height, width, 3))
    elif kind == "gradient":
        while True:  # every colour along the gradient must stay far from the object colours too
            b = np.array(_background_color(r), dtype=np.float64)
            if all(_far_from_objects(a + t * (b - a)) for t in np.linspace(0, 1, 17)):
                break
        dx, dy = r.choice([(1, 0), (0, 1), (1, 1), (1, -1)])
        ys, xs = np.mgrid[0:height, 0:width]
        t = dx * xs / max(width - 1, 1) + dy * ys / max(height - 1, 1)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        pixels = a + t[..., None] * (b - a)
    else:
        noise = np.random.default_rng(r.getrandbits(64)).integers(-NOISE, NOISE + 1, (height, width, 3))
        pixels = a + noise
    return kind, np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _place_word(r: random.Random, pen: ImageDraw.ImageDraw, size: tuple[int, int], taken: np.ndarray,
                light: bool) -> tuple[str, tuple[int, int, int, int]] | None:
    """Render a word where it touches no object (4 px margin); None when no spot is found."""
    width, height = size
    word = r.choice(WORDS)
    font = ImageFont.load_default(size=max(12, round(min(size) / 11)))
    left, top, right, bottom = pen.textbbox((0, 0), word, font=font)
    for _ in range(50):
        x, y = r.randint(2, width - right - 2), r.randint(2, height - bottom - 2)
        box = (x + left, y + top, x + right, y + bottom)
        if not taken[max(0, box[1] - 4):box[3] + 4, max(0, box[0] - 4):box[2] + 4].any():
            pen.text((x, y), word, font=font, fill=(25, 25, 25) if light else (235, 235, 235))
            return word, box
    return None


def normalized_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[float, ...]:
    """A pixel box (x0, y0, x1, y1) of an image of `size` (W, H) as big_vision's (ymin, xmin, ymax, xmax) in [0, 1]."""
    x0, y0, x1, y1 = box
    return y0 / size[1], x0 / size[0], y1 / size[1], x1 / size[0]


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _keeps_visible(masks: list[np.ndarray], new: np.ndarray) -> bool:
    """Whether drawing `new` over `masks` (in drawing order) leaves each of them MIN_VISIBLE visible."""
    cover = new.copy()
    for m in reversed(masks):
        if (m & cover).sum() > (1 - MIN_VISIBLE) * m.sum():
            return False
        cover |= m
    return True


def make_scene(rng, size: int | tuple[int, int] = 224, max_objects: int = 4, word_probability: float = 0.5) -> Scene:
    """A random scene, deterministic from `rng` (random.Random, numpy Generator or int seed)."""
    r = as_random(rng)
    width, height = (size, size) if isinstance(size, int) else size
    if min(width, height) < 64:
        raise ValueError(f"scene size {width}x{height} is too small to draw on; use at least 64x64")
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be 1..4, got {max_objects}")
    kind, pixels = _background(r, (width, height))
    light = float(pixels.mean()) > 110  # dark text on a light background, light text on a dark one
    full_masks, specs = [], []
    wanted = r.randint(1, max_objects)
    for _ in range(200):
        if len(specs) == wanted:
            break
        shape, color = r.choice(SHAPES), r.choice(list(COLORS))
        radius = r.uniform(0.07, 0.16) * min(width, height)
        cx, cy = r.uniform(radius + 1, width - radius - 1), r.uniform(radius + 1, height - radius - 1)
        mask = shape_mask(shape, (width, height), cx, cy, radius)
        if _keeps_visible(full_masks, mask):
            rgb = tuple(min(255, max(0, c + r.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color])
            full_masks.append(mask)
            specs.append((shape, color, rgb))
    objects = []
    for i, (mask, (shape, color, rgb)) in enumerate(zip(full_masks, specs)):
        pixels[mask] = rgb
        visible = mask & ~np.logical_or.reduce(full_masks[i + 1:] or [np.zeros_like(mask)])
        objects.append(Object(shape, color, rgb, _box_of(visible), visible))
    image = Image.fromarray(pixels, "RGB")
    word = word_box = None
    if r.random() < word_probability:
        placed = _place_word(r, ImageDraw.Draw(image), (width, height), np.logical_or.reduce(full_masks), light)
        if placed:
            word, word_box = placed
    return Scene(image, objects, word, word_box, kind)


def patch_labels(scene: Scene, grid: int, min_cover: float = 0.25) -> np.ndarray:
    """int64 (grid * grid, 3), row-major patches of a grid x grid split of the image: the shape (1 + SHAPES
    index) and colour (1 + COLORS index) of the object covering most of the patch (0 when none covers
    `min_cover` of it), and the word (1 + WORDS index) when the patch overlaps the rendered word's box.
    Free dense supervision for warming up a vision tower (world/patch_warmup.py)."""
    width, height = scene.size
    if width % grid or height % grid:
        raise ValueError(f"a {width}x{height} image does not split into a {grid}x{grid} grid of whole patches")
    cover = np.zeros((len(scene.objects) + 1, grid, grid))  # row 0: the "none" threshold
    cover[0] = min_cover
    for k, o in enumerate(scene.objects, 1):
        cover[k] = o.mask.reshape(grid, height // grid, grid, width // grid).mean(axis=(1, 3))
    owner = cover.argmax(0).reshape(-1)  # (grid * grid,) 0 or 1 + object index
    labels = np.zeros((grid * grid, 3), dtype=np.int64)
    for k, o in enumerate(scene.objects, 1):
        labels[owner == k, 0] = 1 + SHAPES.index(o.shape)
        labels[owner == k, 1] = 1 + list(COLORS).index(o.color)
    if scene.word:
        x0, y0, x1, y1 = scene.word_box
        rows = np.arange(grid) * height // grid
        cols = np.arange(grid) * width // grid
        hit = ((rows[:, None] < y1) & (rows[:, None] + height // grid > y0)
               & (cols[None] < x1) & (cols[None] + width // grid > x0))
        labels[hit.reshape(-1), 2] = 1 + WORDS.index(scene.word)
    return labels
