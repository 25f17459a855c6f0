"""nanopali.tasks.drawing: the PNG is written, masks tint exactly their pixels, box edges sit on the box, and
nothing far from any object changes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nanopali.tasks import DetectedObject, draw
from nanopali.tasks.drawing import PALETTE, label_text

W, H = 240, 200
GREY = (120, 120, 120)


def make_object(label, box, mask=None, score=None):
    x0, y0, x1, y1 = box
    norm = (y0 / H, x0 / W, y1 / H, x1 / W)
    return DetectedObject(label=label, box=box, box_normalized=norm, locs=(0, 0, 0, 0), mask=mask, score=score)


@pytest.fixture
def scene():
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 110) ** 2 + (xx - 80) ** 2 <= 25 ** 2  # inside box 0
    objects = [make_object("cat", (40, 60, 130, 170), mask=disc, score=0.931),
               make_object("traffic light", (150, 20, 230, 90))]
    return Image.new("RGB", (W, H), GREY), objects, disc


def test_draw_writes_png_and_tints_masks(tmp_path, scene):
    image, objects, disc = scene
    out = draw(image, objects, tmp_path / "out.png", alpha=0.5)
    saved = Image.open(tmp_path / "out.png")
    assert saved.format == "PNG" and saved.size == (W, H)
    pixels = np.asarray(out)
    np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), pixels)
    tint = np.round(0.5 * np.array(GREY) + 0.5 * np.array(PALETTE[0])).astype(np.uint8)
    np.testing.assert_array_equal(pixels[110, 80], tint)  # the disc's centre
    inside_box_off_mask = (slice(150, 165), slice(110, 125))  # box 0, away from the disc, edges and tag
    assert (pixels[inside_box_off_mask] == GREY).all()


def test_pixels_far_from_objects_do_not_change(scene):
    image, objects, _ = scene
    pixels = np.asarray(draw(image, objects))
    far = np.ones((H, W), bool)
    for o in objects:
        x0, y0, x1, y1 = o.box
        far[max(0, y0 - 30):y1 + 5, max(0, x0 - 5):x1 + 60] = False  # the box, its tag above, a margin
    assert far.sum() > 5000 and (pixels[far] == GREY).all()


def test_box_edges_are_drawn_where_the_box_is(scene):
    image, objects, _ = scene
    pixels = np.asarray(draw(image, objects, line_width=2))
    for i, (x0, y0, x1, y1) in enumerate(o.box for o in objects):
        colour = PALETTE[i]
        ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
        for y, x in [(ym, x0), (ym, x0 + 1), (ym, x1 - 1), (ym, x1 - 2), (y1 - 1, xm), (y1 - 2, xm)]:
            assert tuple(pixels[y, x]) == colour, (i, y, x)
        for y, x in [(ym, x0 - 1), (ym, x1), (y1, xm)]:  # just outside: untouched
            assert tuple(pixels[y, x]) == GREY, (i, y, x)
    # The label tag sits above box 0 and box 1 touches nothing above row 20 but its own tag.
    assert (pixels[45:60, 40:60] != GREY).any() and (pixels[20:40, 150:170] != GREY).any()


def test_label_text_and_errors(scene):
    image, objects, _ = scene
    assert label_text(objects[0]) == "cat 0.93" and label_text(objects[1]) == "traffic light"
    bad = make_object("dog", (10, 10, 50, 50), mask=np.ones((10, 10), bool))
    with pytest.raises(ValueError, match=r"object 0 \('dog'\) has a mask of shape \(10, 10\).*shape \(200, 240\)"):
        draw(image, [bad])
    with pytest.raises(ValueError, match="alpha is the mask opacity"):
        draw(image, objects, alpha=2)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        draw(image, objects, "/nonexistent-dir/x.png")


def test_draw_accepts_arrays_and_empty_lists():
    array = np.full((H, W, 3), 7, np.uint8)
    assert (np.asarray(draw(array, [])) == 7).all()
