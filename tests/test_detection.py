"""nanopali.tasks.detection: parsing against big_vision's evaluator logic (parse_ref_bigvision.json) and the
Hugging Face Space's parser (hfspace_parse_ref.json), malformed and random strings, and encode/parse round trips.

big_vision has no string parser: its segmentation evaluator keeps the first object of a string only when it has
4 locs then 16 segs, ordered. The box of such an object must be identical here; detection-only objects (which
that evaluator rejects for lacking segs) must give the README's "formula only" box.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from nanopali.tasks import DetectedObject, ParsedObjects, box_to_locs, encode_box, parse_objects
from nanopali.tasks.locseg import CONVENTIONS

REF = Path(__file__).resolve().parent / "fixtures" / "vqvae"
W, H = 640, 480


def yxyx_to_xyxy(b):
    y0, x0, y1, x1 = b
    return (x0, y0, x1, y1)


def test_boxes_match_big_vision_evaluator():
    ref = json.loads((REF / "parse_ref_bigvision.json").read_text())
    assert (ref["image_w"], ref["image_h"]) == (W, H)
    for case in ref["cases"]:
        objs = parse_objects(case["string"], image_size=(W, H))
        formula = case["first_object_raw_formula_only"]
        if case["valid"]:  # the evaluator keeps the first object: identical tokens, box and normalized box
            first = objs[0]
            assert list(first.locs) + first.seg == case["tokens"]
            assert first.box == yxyx_to_xyxy(case["box_px_ymin_xmin_ymax_xmax_480x640"])
            assert first.box_normalized == tuple(case["box_norm_ymin_xmin_ymax_xmax"])
        elif formula is None:  # only 3 locs
            assert objs.dropped[0].reason == "expected 4 <loc> tokens, found 3", case["string"]
        elif formula["locs"][2] <= formula["locs"][0]:  # ymax < ymin: rejected by both
            assert not objs and objs.dropped[0].reason.startswith("degenerate box"), case["string"]
        else:  # a detection, invalid only for the segmentation evaluator, which needs seg tokens
            assert objs[0].seg is None
            assert objs[0].box == yxyx_to_xyxy(formula["box_px_480x640"])
            assert objs[0].box_normalized == tuple(formula["box_norm"])


def test_objects_match_hf_space_parser():
    """Same objects and boxes under convention="hfspace"; labels are stripped here ("cat " in the Space), text
    without an object is in .dropped, and a box with ymax < ymin (kept by the Space) is dropped here."""
    ref = json.loads((REF / "hfspace_parse_ref.json").read_text())
    for case in ref["cases"]:
        objs = parse_objects(case["string"], image_size=(W, H), convention="hfspace")
        kept, dropped = [], []
        for o in case["objects"]:
            if "name" not in o:
                dropped.append(o["content"].strip(" ;"))
            elif (b := o["box_px_ymin_xmin_ymax_xmax_480x640"])[2] <= b[0]:
                dropped.append(o["content"].strip(" ;"))
            else:
                kept.append((o["name"].strip(), yxyx_to_xyxy(b), o["has_mask"]))
        assert [(o.label, o.box, o.seg is not None) for o in objs] == kept, case["string"]
        assert [d.text for d in objs.dropped] == dropped, case["string"]


def test_spans_cover_each_object():
    text = "<loc0010><loc0020><loc0500><loc0600> traffic light ; <loc0300><loc0400><loc1000><loc1023>dog"
    objs = parse_objects(text, image_size=(W, H))
    assert isinstance(objs, ParsedObjects) and isinstance(objs[0], DetectedObject)
    assert [text[slice(*o.span)] for o in objs] == [
        "<loc0010><loc0020><loc0500><loc0600> traffic light", "<loc0300><loc0400><loc1000><loc1023>dog"]
    assert [o.label for o in objs] == ["traffic light", "dog"] and objs[0].score is None


def test_whitespace_and_missing_separators_are_tolerated():
    text = "\n<loc0100> <loc0200>\n<loc0300>  <loc0400>  <seg001>" + "<seg002> " * 15 + " cat<loc0100><loc0200>" \
           "<loc0300><loc0400>;;<loc0100><loc0200><loc0300><loc0400> ; "
    objs = parse_objects(text, image_size=(W, H))
    assert [(o.label, o.seg is not None) for o in objs] == [("cat", True), ("", False), ("", False)]
    assert not objs.dropped
    assert objs[0].seg == [1] + [2] * 15


@pytest.mark.parametrize("text, reason", [
    ("no objects here", "no <loc> tokens"),
    ("<loc0100><loc0200><loc0300> cat", "expected 4 <loc> tokens, found 3"),
    ("<loc0100><loc0200><loc0300><loc0400><loc0500> cat", "expected 4 <loc> tokens, found 5"),
    ("<loc0100><loc0200><loc0300><loc0400><seg001><seg002> cat", "expected 0 or 16 <seg> tokens"),
    ("<loc0100><loc0200><loc0300><loc0400>" + "<seg001>" * 17 + " cat", "expected 0 or 16 <seg> tokens"),
    ("<loc0100><loc0200><loc0300><loc0400> cat <seg001>", "unexpected <seg001> after the label"),
    ("<loc0100><loc0200><loc0300><loc1024> cat", "malformed token <loc1024>"),
    ("<loc100><loc0200><loc0300><loc0400> cat", "malformed token <loc100>"),
    ("<loc0100><loc0200><loc0300><loc0400>" + "<seg128>" * 16 + " cat", "malformed token <seg128>"),
    ("<loc0300><loc0200><loc0300><loc0400> cat", "degenerate box"),
    ("<loc0100><loc0400><loc0300><loc0200> cat", "degenerate box"),
    ("<loc0101><loc0200><loc0102><loc0400> cat", "is empty at 640x480 pixels"),  # 47.39 and 47.86 -> 47
])
def test_malformed_objects_are_dropped_with_a_reason(text, reason):
    good = "<loc0000><loc0000><loc1023><loc1023> wall"
    objs = parse_objects(f"{good} ; {text} ; {good}", image_size=(W, H))
    assert [o.label for o in objs] == ["wall", "wall"], "a bad object must not affect its neighbours"
    (dropped,) = objs.dropped
    assert reason in dropped.reason and dropped.text == text.strip()


def test_random_garbage_never_crashes():
    rng = random.Random(0)
    parts = ["<loc0123>", "<loc1023>", "<loc0000>", "<seg045>", "<seg127>", "<loc9999>", "<seg999>", "<loc", "<seg",
             ">", "<", ";", " ; ", " ", "\n", "cat", "traffic light", "é✓", "<loc12>", "<eos>", "\x00"]
    for _ in range(400):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 40)))
        w, h = rng.randint(1, 2000), rng.randint(1, 2000)
        for convention in CONVENTIONS:
            objs = parse_objects(text, image_size=(w, h), convention=convention)
            spans = sorted([o.span for o in objs] + [d.span for d in objs.dropped])
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "objects overlap"
            for o in objs:
                x0, y0, x1, y1 = o.box
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and (o.seg is None or len(o.seg) == 16)
                assert text[slice(*o.span)].startswith("<loc")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown box convention 'pix2seq'; valid: bigvision, hfspace"):
        parse_objects("", image_size=(W, H), convention="pix2seq")
    with pytest.raises(ValueError, match=r"image_size must be \(width, height\)"):
        parse_objects("", image_size=480)
    with pytest.raises(ValueError, match="must be positive"):
        parse_objects("", image_size=(0, 480))
    with pytest.raises(TypeError, match="as a str, got bytes"):
        parse_objects(b"<loc0001>", image_size=(W, H))
    with pytest.raises(ValueError, match="needs ymax > ymin"):
        encode_box((0.5, 0.1, 0.2, 0.9))
    with pytest.raises(ValueError, match="4 finite numbers"):
        encode_box((0.1, float("nan"), 0.2, 0.9))
    with pytest.raises(ValueError, match="is empty inside the 640x480 image"):
        encode_box((10, 10, 10, 20), image_size=(W, H))


def test_encode_box_formats_like_big_vision():
    # refcoco_mask2str: float32 round half to even of 1023 * coordinate (encoder_ref.json case 0).
    assert encode_box((0.2, 0.25, 0.7, 0.6)) == "<loc0205><loc0256><loc0716><loc0614>"
    assert encode_box((-0.1, 0.0, 1.0, 1.5)) == "<loc0000><loc0000><loc1023><loc1023>"  # clipped


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_encode_then_parse_round_trips(convention):
    rng = random.Random(1)
    scale = CONVENTIONS[convention].scale
    for _ in range(300):
        w, h = rng.randint(16, 3000), rng.randint(16, 3000)
        # Tokens -> box -> tokens is the identity.
        y0, y1 = sorted(rng.sample(range(1024), 2))
        x0, x1 = sorted(rng.sample(range(1024), 2))
        text = "".join(f"<loc{v:04d}>" for v in (y0, x0, y1, x1)) + " thing"
        objs = parse_objects(text, image_size=(w, h), convention=convention)
        for o in objs:
            assert encode_box(o.box_normalized, convention=convention) + " thing" == text
        # Normalized box -> tokens -> box: within half a bin.
        a, b = sorted(rng.uniform(0, 1) for _ in range(2))
        c, d = sorted(rng.uniform(0, 1) for _ in range(2))
        if b - a > 2 / scale and d - c > 2 / scale:
            (o,) = parse_objects(encode_box((a, c, b, d), convention=convention), (w, h), convention=convention)
            assert max(abs(p - q) for p, q in zip(o.box_normalized, (a, c, b, d))) <= 0.5 / scale + 1e-7
        # Pixel box -> tokens -> pixel box: exact when the side fits in the bins, else within one bin. The
        # Space's loc / 1024 never reaches 1, so its far edge (x1 = W) is exact only when W / 1024 < 0.5.
        px0, px1 = sorted(rng.sample(range(w + 1), 2))
        py0, py1 = sorted(rng.sample(range(h + 1), 2))
        objs = parse_objects(encode_box((px0, py0, px1, py1), (w, h), convention), (w, h), convention=convention)
        if not objs:  # only a sub-bin box on a side wider than the bins may collapse
            assert min(px1 - px0, py1 - py0) <= max(w, h) / 1023
            continue
        for got, want, size in zip(objs[0].box, (px0, py0, px1, py1), (w, h, w, h)):
            exact = size <= 1023 and (convention == "bigvision" or want < size or size < 512)
            assert abs(got - want) <= (0 if exact else math.ceil(size / scale)), (convention, w, h, want, got)


def test_pixel_boxes_encode_to_the_nearest_decoding_bin():
    # paste_ref case 0: locs (100, 200, 800, 900) decode to this box at 224x224; the first bin that decodes to
    # y0 = 21 is 96 (96 / 1023 * 224 = 21.02), so the pixel box encodes to it, not to 100.
    box = (43, 21, 197, 175)
    assert box_to_locs(box, (224, 224)) == (96, 197, 800, 900)
    assert encode_box(box, (224, 224)) == "<loc0096><loc0197><loc0800><loc0900>"
    assert parse_objects(encode_box(box, (224, 224)) + " cat", (224, 224))[0].box == box
