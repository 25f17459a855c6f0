"""The toy world's text side: a scene's caption, questions and examples in PaliGemma syntax.

    scene = make_scene(scene_rng(seed, i))
    for ex in examples(scene, rng, vae):           # rng: the scene's generator, drawn on after the scene
        ex["prefix"], ex["suffix"]                   # "detect star ; circle", "<loc0123>... star ; ..."

The examples are a pure function of (scene, rng):
    caption en          one object: "a red circle"; two: "a red circle above a blue square" (the first is
                        the one earlier in SHAPES, then COLORS, then top-to-bottom); 3-4: a counted list
                        "two red circles, a blue square and a green star"; a word adds ' with the word "cat"'.
    answer en ...       "how many circles are there?" (each shape present, one absent, and all shapes) ->
                        "2"; "what color is the circle?" / "what shape is the red object?" / "where is the
                        red circle?" (POSITIONS, the 3x3 cell of the box centre) only when the answer is unique.
    detect a ; b        one or two present shapes; all objects of each label in prompt order, within a label
                        top-to-bottom then left-to-right by (y0, x0); boxes as big_vision, round(v * 1023).
    segment X           one object with a unique description (its shape, else colour + shape); needs a VAE.
    ocr                 the word, when the scene has one.
"""

from __future__ import annotations

import random

from nanopali.tasks import encode_box, encode_segmentation
from nanopali.world.scenes import COLORS, NUMBERS, POSITIONS, SHAPES, Object, Scene, as_random, normalized_box


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def _order(obj: Object) -> tuple:
    """Caption order: SHAPES order, then COLORS order, then top-to-bottom, left-to-right."""
    return SHAPES.index(obj.shape), list(COLORS).index(obj.color), obj.center[1], obj.center[0]


def position(obj: Object, size: tuple[int, int]) -> str:
    """The POSITIONS entry of the 3x3 grid cell holding the centre of the object's box."""
    cx, cy = obj.center
    col, row = min(int(3 * cx / size[0]), 2), min(int(3 * cy / size[1]), 2)
    return POSITIONS[3 * row + col]


def relation(a: Object, b: Object) -> str:
    """Where a is relative to b, along the axis on which their box centres differ more."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def caption(scene: Scene) -> str:
    objs = sorted(scene.objects, key=_order)
    if len(objs) == 1:
        text = _article(objs[0].label)
    elif len(objs) == 2:
        text = f"{_article(objs[0].label)} {relation(objs[0], objs[1])} {_article(objs[1].label)}"
    else:
        groups: dict[str, int] = {}
        for o in objs:
            groups[o.label] = groups.get(o.label, 0) + 1
        parts = [_article(label) if n == 1 else f"{NUMBERS[n]} {label.split()[0]} {_plural(label.split()[1])}"
                 for label, n in groups.items()]
        text = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return text + (f' with the word "{scene.word}"' if scene.word else "")


def description(obj: Object, objects: list[Object]) -> str | None:
    """The shortest unique name of obj among objects: its shape, else colour + shape, else None."""
    if sum(o.shape == obj.shape for o in objects) == 1:
        return obj.shape
    if sum(o.label == obj.label for o in objects) == 1:
        return obj.label
    return None


def questions(scene: Scene, r: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs that have a unique answer in the scene."""
    objs = scene.objects
    present = sorted({o.shape for o in objs}, key=SHAPES.index)
    absent = [s for s in SHAPES if s not in present]
    asked = present + ([r.choice(absent)] if absent else [])
    qa = [(f"how many {_plural(s)} are there?", str(sum(o.shape == s for o in objs))) for s in asked]
    qa.append(("how many shapes are there?", str(len(objs))))
    for o in sorted(objs, key=_order):
        if sum(p.shape == o.shape for p in objs) == 1:
            qa.append((f"what color is the {o.shape}?", o.color))
        if sum(p.color == o.color for p in objs) == 1:
            qa.append((f"what shape is the {o.color} object?", o.shape))
        if name := description(o, objs):
            qa.append((f"where is the {name}?", position(o, scene.size)))
    return qa


def detection(scene: Scene, labels: list[str]) -> str:
    """The detect suffix for shape labels: each label's objects by (y0, x0), labels in the given order."""
    found = [o for label in labels for o in sorted(scene.objects, key=lambda o: (o.box[1], o.box[0]))
             if o.shape == label]
    return " ; ".join(f"{encode_box(normalized_box(o.box, scene.size))} {o.shape}" for o in found)


def examples(scene: Scene, rng, vae=None) -> list[dict[str, str]]:
    """All examples of a scene as {"prefix", "suffix"} dicts; segment needs `vae` (a SegmentationVAE)."""
    r = as_random(rng)
    out = [{"prefix": "caption en", "suffix": caption(scene)}]
    out += [{"prefix": f"answer en {q}", "suffix": a} for q, a in questions(scene, r)]
    present = sorted({o.shape for o in scene.objects}, key=SHAPES.index)
    labels = r.sample(present, min(len(present), r.choice([1, 2])))
    out.append({"prefix": "detect " + " ; ".join(labels), "suffix": detection(scene, labels)})
    named = [(o, d) for o in scene.objects if (d := description(o, scene.objects))]
    if vae is not None and named:
        obj, name = r.choice(named)
        seg = encode_segmentation(obj.mask, normalized_box(obj.box, scene.size), vae)
        out.append({"prefix": f"segment {name}", "suffix": f"{seg} {name}"})
    if scene.word:
        out.append({"prefix": "ocr", "suffix": scene.word})
    return out
