"""The toy world's contrastive side: the texts paired with a scene, the zero-shot prompts, the recipe's dataset."""

from __future__ import annotations

import numpy as np
import pytest

from nanopali.world.examples import caption
from nanopali.world.recipe.siglip import WorldPairs, write_pairs
from nanopali.world.scenes import COLORS, NUMBERS, SHAPES, make_scene, scene_rng
from nanopali.world.siglip import COUNTS, pair_texts, zero_shot_tasks


def test_pair_texts_are_caption_count_and_a_present_object():
    for i in range(50):
        rng = scene_rng(7, i)
        scene = make_scene(rng, size=64)
        text, count, label = pair_texts(scene, rng)
        assert text == caption(scene)
        n = len(scene.objects)
        assert count == f"{NUMBERS[n]} shape{'s' if n > 1 else ''}"
        assert label.split(" ", 1)[1] in {o.label for o in scene.objects}
        assert label.split(" ", 1)[0] == ("an" if label.split(" ", 1)[1][0] in "aeiou" else "a")


def test_zero_shot_prompts_name_the_truth_and_only_vary_one_attribute():
    seen = set()
    for i in range(200):
        scene = make_scene(scene_rng(8, i), size=64)
        tasks = zero_shot_tasks(scene)
        prompts, truth = tasks["count"]
        assert prompts == list(COUNTS) and prompts[truth].startswith(NUMBERS[len(scene.objects)] + " ")
        if len(scene.objects) != 1:
            assert set(tasks) == {"count"}
            continue
        (obj,) = scene.objects
        colors, c = tasks["color"]
        shapes, s = tasks["shape"]
        assert len(colors) == len(COLORS) and colors[c].endswith(f"{obj.color} {obj.shape}")
        assert all(p.endswith(" " + obj.shape) for p in colors)
        assert len(shapes) == len(SHAPES) and shapes[s].endswith(f"{obj.color} {obj.shape}")
        assert all(f" {obj.color} " in f" {p}" for p in shapes)
        seen.add(obj.color)
    assert len(seen) > 4


def test_world_pairs_index_every_scene_with_each_text(tmp_path):
    write_pairs(tmp_path / "pairs.npz", seed=9, n=5, size=64)
    pairs = WorldPairs(tmp_path / "pairs.npz")
    assert len(pairs) == 15
    for k in (0, 4, 14):
        scene, j = divmod(k, 3)
        rng = scene_rng(9, scene)
        truth = make_scene(rng, size=64)
        assert pairs[k]["text"] == pair_texts(truth, rng)[j]
        assert np.array_equal(np.asarray(pairs[k]["image"]), np.asarray(truth.image))


def test_the_default_model_recipe_can_start_its_vision_tower_from_a_siglip(tmp_path, monkeypatch):
    """--vision-from: PaliGemma's init with the SigLIP's tower (its pooling head left out), every other weight the
    recipe's own init. The world tokenizer is the shipped one (stage_tokenizer's output, copied in)."""
    import shutil

    import torch

    from nanopali import PaliGemma, SigLIP
    from nanopali.paths import DEFAULT_MODEL_DIR
    from nanopali.world.recipe import stages
    from nanopali.world.recipe.siglip import init_model

    work = tmp_path / "work"
    (work / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, work / "tokenizer" / name)
    siglip = init_model(tmp_path / "siglip", "siglip")
    torch.manual_seed(3)
    model = SigLIP.from_pretrained(siglip)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # unlike any init, so copied weights are recognisable
    model.save_pretrained(siglip)
    out = stages.stage_siglip_init(work, siglip)
    pali, plain = PaliGemma.from_pretrained(out), PaliGemma.from_pretrained(stages.stage_init(work))
    tower = model.vision_model.state_dict()
    for k, v in pali.vision.state_dict().items():
        assert torch.equal(v, tower[k]), k
    for k, v in pali.state_dict().items():
        if not k.startswith("vision_tower."):
            assert torch.equal(v, plain.state_dict()[k]), k
