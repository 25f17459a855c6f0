"""The toy world: deterministic scenes, and examples that agree with the scene they describe."""

import importlib.util
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nanopali.tasks import SegmentationVAE, parse_objects
from nanopali.train import JsonlDataset
from nanopali.world import recipe
from nanopali.world.examples import detection, examples
from nanopali.world.recipe import stages
from nanopali.world.scenes import COLORS, POSITIONS, SHAPES, WORDS, make_scene, patch_labels, scene_rng

ROOT = Path(__file__).resolve().parents[1]
VAE_PATH = ROOT / "tests" / "fixtures" / "vqvae" / "vae-random.npz"
SEEDS = range(40)


@pytest.fixture(scope="module")
def vae():
    return SegmentationVAE.from_npz(VAE_PATH)


@pytest.fixture(scope="module")
def scenes(vae):
    """(scene, examples) for each seed, both drawn from one random.Random as the script does."""
    out = []
    for seed in SEEDS:
        rng = random.Random(seed)
        scene = make_scene(rng)
        out.append((scene, examples(scene, rng, vae)))
    return out


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def normalized(box, size):
    x0, y0, x1, y1 = box
    return np.array([y0 / size[1], x0 / size[0], y1 / size[1], x1 / size[0]])


def test_same_seed_same_scene_and_examples_other_seed_differs(vae):
    def make(seed):
        rng = random.Random(seed)
        scene = make_scene(rng)
        return png(scene.image), examples(scene, rng, vae)

    assert make(3) == make(3)
    assert make(3)[0] != make(4)[0], "seeds 3 and 4 drew the same image"
    a, b = make_scene(np.random.default_rng(5)), make_scene(np.random.default_rng(5))
    assert png(a.image) == png(b.image), "a numpy Generator seed is not deterministic"


def test_scenes_are_well_formed(scenes):
    counts = {len(scene.objects) for scene, _ in scenes}
    assert counts == {1, 2, 3, 4}, f"40 seeds drew object counts {counts}"
    assert {scene.background for scene, _ in scenes} == {"plain", "gradient", "noise"}
    for scene, _ in scenes:
        pixels = np.asarray(scene.image).astype(int)
        taken = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.color in COLORS
            assert max(abs(a - b) for a, b in zip(obj.rgb, COLORS[obj.color])) <= 12
            assert not (obj.mask & taken).any(), "visible masks overlap"
            taken |= obj.mask
            ys, xs = np.nonzero(obj.mask)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), "box is not the mask's tight box"
            assert (pixels[obj.mask] == obj.rgb).all(), "the visible mask is not painted in the object's colour"
        if scene.word:
            x0, y0, x1, y1 = scene.word_box
            assert not taken[y0:y1, x0:x1].any(), "the word covers an object"
            taken[y0:y1, x0:x1] = True
        background = pixels[~taken]
        for obj in scene.objects:  # a background pixel never looks like an object
            assert np.sqrt(((background - obj.rgb) ** 2).sum(-1)).min() >= 60


def test_detect_suffixes_parse_back_to_the_objects(scenes):
    for scene, exs in scenes:
        asked = [e for e in exs if e["prefix"].startswith("detect ")]
        every = " ".join(sorted({o.shape for o in scene.objects}))
        prompts = [(e["prefix"][7:].split(" ; "), e["suffix"]) for e in asked]
        prompts.append((every.split(), detection(scene, every.split())))
        for labels, suffix in prompts:
            parsed = parse_objects(suffix, image_size=scene.size)
            assert not parsed.dropped, parsed.dropped
            expected = [o for label in labels for o in sorted(scene.objects, key=lambda o: (o.box[1], o.box[0]))
                        if o.shape == label]
            assert [p.label for p in parsed] == [o.shape for o in expected]
            for p, o in zip(parsed, expected):
                err = np.abs(np.array(p.box_normalized) - normalized(o.box, scene.size)).max()
                assert err <= 1 / 1023, f"{suffix}: box {p.box} vs object {o.box}"
                assert max(abs(a - b) for a, b in zip(p.box, o.box)) <= 1


def test_segment_suffix_decodes_to_the_named_object(scenes, vae):
    for scene, exs in scenes:
        (seg,) = [e for e in exs if e["prefix"].startswith("segment ")]
        name = seg["prefix"][len("segment "):]
        matches = [o for o in scene.objects if name in (o.shape, o.label)]
        assert len(matches) == 1, f"'{seg['prefix']}' does not name exactly one object"
        parsed = parse_objects(seg["suffix"], image_size=scene.size, vae=vae)
        assert not parsed.dropped and len(parsed) == 1, parsed.dropped
        (obj,) = parsed
        assert obj.label == name and len(obj.seg) == 16
        assert obj.mask is not None and obj.mask.shape == (scene.size[1], scene.size[0])
        err = np.abs(np.array(obj.box_normalized) - normalized(matches[0].box, scene.size)).max()
        assert err <= 1 / 1023


def where(obj, size) -> str:
    cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    row = "top" if cy < size[1] / 3 else "bottom" if cy >= 2 * size[1] / 3 else ""
    col = "left" if cx < size[0] / 3 else "right" if cx >= 2 * size[0] / 3 else ""
    return f"{row} {col}".strip() or "center"


def test_answers_agree_with_the_scene(scenes):
    asked = set()
    for scene, exs in scenes:
        objs = scene.objects
        for e in exs:
            q, a = e["prefix"], e["suffix"]
            if m := re.fullmatch(r"answer en how many (\w+?)(es|s) are there\?", q):
                shape = m.group(1) if m.group(1) in SHAPES else m.group(1) + "e"
                want = len(objs) if shape == "shape" else sum(o.shape == shape for o in objs)
                assert a == str(want), (q, a)
            elif m := re.fullmatch(r"answer en what color is the (\w+)\?", q):
                (obj,) = [o for o in objs if o.shape == m.group(1)]
                assert a == obj.color, (q, a)
            elif m := re.fullmatch(r"answer en what shape is the (\w+) object\?", q):
                (obj,) = [o for o in objs if o.color == m.group(1)]
                assert a == obj.shape, (q, a)
            elif m := re.fullmatch(r"answer en where is the (.+)\?", q):
                (obj,) = [o for o in objs if m.group(1) in (o.shape, o.label)]
                assert a in POSITIONS and a == where(obj, scene.size), (q, a, obj.box)
            else:
                assert not q.startswith("answer"), f"unexpected question {q!r}"
                continue
            asked.add(q.split()[2])
    assert asked == {"how", "what", "where"}


def test_captions_describe_the_scene(scenes):
    label = r"an? (\w+) (\w+)"
    for scene, exs in scenes:
        (cap,) = [e["suffix"] for e in exs if e["prefix"] == "caption en"]
        if scene.word:
            assert cap.endswith(f' with the word "{scene.word}"')
            cap = cap[: -len(f' with the word "{scene.word}"')]
        objs = scene.objects
        if len(objs) == 1:
            assert cap == f"{'an' if objs[0].color[0] in 'aeiou' else 'a'} {objs[0].label}"
        elif len(objs) == 2:
            m = re.fullmatch(f"{label} (above|below|left of|right of) {label}", cap)
            assert m, cap
            a = next(o for o in objs if (o.color, o.shape) == m.group(1, 2))
            b = next(o for o in objs if (o.color, o.shape) == m.group(4, 5) and o is not a)
            dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
            along = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}[m.group(3)]
            assert along > 0 and along == max(abs(dx), abs(dy)), (cap, a.box, b.box)
            order = [(SHAPES.index(o.shape), list(COLORS).index(o.color)) for o in (a, b)]
            assert order[0] <= order[1], f"{cap}: not in SHAPES, then COLORS order"
        else:
            numbers = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
            total = sum(numbers[part.split()[0]] for part in re.split(r", | and ", cap))
            assert total == len(objs), cap


def test_ocr_is_the_rendered_word(scenes):
    words = 0
    for scene, exs in scenes:
        ocr = [e["suffix"] for e in exs if e["prefix"] == "ocr"]
        assert ocr == ([scene.word] if scene.word else [])
        assert scene.word is None or scene.word in WORDS
        words += bool(scene.word)
    assert 0 < words < len(scenes)


def test_script_writes_jsonl_the_trainer_loads(tmp_path, capsys):
    script = _script("make_world_data")
    script.main(["--out", str(tmp_path), "--n", "6", "--seed", "1", "--size", "128", "--vae", str(VAE_PATH)])
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    data = JsonlDataset(tmp_path / "train.jsonl", skip_bad=True)
    assert data.skipped == [] and len(data) == len(lines)
    assert {json.loads(line)["image"] for line in lines} == {f"images/{i:06d}.png" for i in range(6)}
    printed = capsys.readouterr().out
    assert "caption" in printed and "segment" in printed and f"total                {len(lines)}" in printed


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="too small"):
        make_scene(random.Random(0), size=16)
    with pytest.raises(TypeError, match="random.Random"):
        make_scene("seed")


def test_patch_labels_name_the_object_word_or_nothing_under_each_patch(scenes):
    for scene, _ in scenes[:15]:
        grid = 8
        labels = patch_labels(scene, grid)
        assert labels.shape == (grid * grid, 3)
        w, h = scene.size
        for p, (shape, color, word) in enumerate(labels):
            r, c = divmod(p, grid)
            cell = (slice(r * h // grid, (r + 1) * h // grid), slice(c * w // grid, (c + 1) * w // grid))
            cover = [o.mask[cell].mean() for o in scene.objects]
            if max(cover) >= 0.25:  # the patch's label is the object covering most of it
                best = scene.objects[int(np.argmax(cover))]
                assert (SHAPES[shape - 1], list(COLORS)[color - 1]) == (best.shape, best.color)
            else:
                assert shape == color == 0
            if word:
                x0, y0, x1, y1 = scene.word_box
                assert WORDS[word - 1] == scene.word
                assert cell[0].start < y1 and cell[0].stop > y0 and cell[1].start < x1 and cell[1].stop > x0
        if scene.word:
            assert (labels[:, 2] > 0).any()
    with pytest.raises(ValueError, match="whole patches"):
        patch_labels(scenes[0][0], 9)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_word_probe_reads_words_only_from_features_that_carry_them():
    """scripts/probe_word_features.py's logistic regression: near-perfect on features that encode the word
    (one noisy direction per word), near chance when the same features are paired with shuffled words."""
    probe = _script("probe_word_features")
    g = torch.Generator().manual_seed(0)
    words = torch.randint(len(WORDS), (1200,), generator=g)
    directions = torch.randn(len(WORDS), 32, generator=g)
    x = directions[words] + 0.3 * torch.randn(1200, 32, generator=g)
    assert probe.probe_accuracy(x, words, n_fit=1000) > 0.95
    assert probe.probe_accuracy(x, words[torch.randperm(1200, generator=g)], n_fit=1000) < 0.15


def test_word_probe_averages_the_image_tokens_over_the_word_patches():
    probe = _script("probe_word_features")
    from nanopali import PaliGemma, PaliGemmaConfig, TextConfig, VisionConfig
    torch.manual_seed(0)
    model = PaliGemma(PaliGemmaConfig(
        VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16),
        TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16), image_token_index=299)).init_weights().eval()
    scenes = [s for s in (make_scene(random.Random(f"probe:{i}"), size=64) for i in range(40)) if s.word][:3]
    images = np.stack([np.asarray(s.image) for s in scenes])
    labels = np.stack([patch_labels(s, 4) for s in scenes])
    got = probe.word_features(model, images, labels, batch=2)
    with torch.no_grad():
        tokens = model.image_features(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    for i in range(len(scenes)):
        on_word = labels[i, :, 2] > 0
        assert 0 < on_word.sum() < 16
        torch.testing.assert_close(got[i], tokens[i, torch.from_numpy(on_word)].mean(0))


def test_recipe_examples_repeat_per_task_and_carry_their_scenes_patch_labels(tmp_path):
    """recipe.WorldExamples: each example listed repeat[task] times, with its own scene's image and
    (for the auxiliary loss) per-patch labels; the card names each later cycle's auxiliary loss."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (3, 4, 3))
    rows = [(0, "caption en", "a red circle"), (2, "ocr", "cat"), (1, "answer en how many shapes?", "2")]
    np.savez(tmp_path / "d.npz", images=images, labels=labels, scene=np.array([r[0] for r in rows]),
             prefix=np.array([r[1] for r in rows]), suffix=np.array([r[2] for r in rows]))
    data = recipe.WorldExamples(tmp_path / "d.npz", {"caption": 2, "ocr": 3}, patch_labels=True)
    assert [item["prefix"] for item in data] == ["caption en"] * 2 + ["ocr"] * 3 + ["answer en how many shapes?"]
    for item in data:
        scene = next(r[0] for r in rows if r[1] == item["prefix"])
        assert np.array_equal(np.asarray(item["image"]), images[scene])
        assert np.array_equal(item["patch_labels"], labels[scene])
    assert "patch_labels" not in recipe.WorldExamples(tmp_path / "d.npz")[0]
    lines = [recipe.cycle_line(k, cycle) for k, cycle in enumerate(recipe.MORE)]
    assert ["auxiliary loss" in line for line in lines] == [bool(c.get("patch_loss")) for c in recipe.MORE]


def test_recipe_reading_cycles_carry_the_previous_cycles_heads(tmp_path):
    """recipe.patch_loss: none for a cycle without "patch_loss"; for a reading cycle, fresh heads
    seeded by the cycle (the same twice) after a checkpoint trained without them, else that checkpoint's heads."""
    from nanopali.train import checkpoint
    plain, first, second = recipe.MORE[0], recipe.MORE[-2], recipe.MORE[-1]
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir(), after.mkdir()
    torch.save({"step": 1}, before / checkpoint.STATE_FILE)
    assert recipe.patch_loss(plain, before) is None
    fresh = recipe.patch_loss(first, before)
    assert fresh.weight == first["patch_loss"]
    for k, v in recipe.patch_loss(first, before).state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    trained = {k: v + 1.0 for k, v in fresh.state_dict().items()}
    torch.save({"step": 2, "auxiliary": {"module": trained}}, after / checkpoint.STATE_FILE)
    carried = recipe.patch_loss(second, after).state_dict()
    for k, v in trained.items():
        assert torch.equal(carried[k], v), k
    shipped = tmp_path / "shipped"  # weights without a trainer state (the shipped model): fresh heads
    shipped.mkdir()
    for k, v in recipe.patch_loss(first, shipped).state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_recipe_more_continues_after_a_start_checkpoint(tmp_path, monkeypatch):
    """make_default_model --stage more --start DIR: only the cycles after DIR's (named by its run directory)
    are trained, the first from DIR, each next one from the last one's result; a DIR outside a run directory
    named like the recipe's is refused."""
    from nanopali.train import checkpoint
    trained = []

    def fake_fit(config, train_data, auxiliary=None):
        trained.append((Path(config.out).name, Path(config.model), config.steps, auxiliary is not None, *train_data))
        done = Path(config.out) / f"{checkpoint.PREFIX}{config.steps:06d}"
        done.mkdir(parents=True)
        torch.save({"step": config.steps}, done / checkpoint.STATE_FILE)
        return done

    monkeypatch.setattr(stages, "fit", fake_fit)
    monkeypatch.setattr(stages, "stage_data", lambda work, split="train": work / f"data-{split}.npz")
    monkeypatch.setattr(stages, "WorldExamples", lambda path, *args, **kwargs: [path.name])
    start = tmp_path / recipe.RUNS[-3] / "checkpoint-000010"
    start.mkdir(parents=True)
    (start / "config.json").write_text("{}")
    torch.save({"step": 10}, start / checkpoint.STATE_FILE)
    last = stages.stage_more(tmp_path, start)
    data = [f"data-{recipe.MORE[k].get('data', 'train')}.npz" for k in (-2, -1)]  # each cycle on its own split
    assert trained == [(recipe.RUNS[-2], start, recipe.MORE[-2]["steps"], True, data[0]),
                       (recipe.RUNS[-1], tmp_path / recipe.RUNS[-2] / f"checkpoint-{recipe.MORE[-2]['steps']:06d}",
                        recipe.MORE[-1]["steps"], True, data[1])]
    assert last.parent.name == recipe.RUNS[-1]
    elsewhere = tmp_path / "copied" / "checkpoint-000010"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="run directory"):
        stages.stage_more(tmp_path, elsewhere)
    with pytest.raises(SystemExit, match="last cycle"):  # nothing after it: an error, not a silent no-op
        stages.stage_more(tmp_path, last)
    with pytest.raises(SystemExit):  # --start without --stage more alone would also train from scratch
        _script("make_default_model").main(["--work", str(tmp_path), "--start", str(start)])
    assert trained[2:] == []


def test_recipe_fresh_split_holds_the_training_seeds_next_scenes(tmp_path, monkeypatch):
    """stages.stage_data("fresh"): scenes FIRST_SCENE["fresh"]... of the training seed (no split
    shares a scene with another), stored from index 0, each example pointing at its own scene's image."""
    from nanopali.paths import DEFAULT_MODEL_DIR
    from nanopali.tasks.vqvae import CHECKPOINT_NAME
    from nanopali.world.examples import caption
    ranges = sorted((stages.FIRST_SCENE[s], stages.FIRST_SCENE[s] + stages.N_SCENES[s], stages.SEEDS[s])
                    for s in stages.N_SCENES)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # no scene in two splits
    assert {seed for *_, seed in ranges} == {stages.SEEDS["train"]}
    monkeypatch.setattr(stages, "N_SCENES", {"fresh": 3})
    monkeypatch.setattr(stages, "FIRST_SCENE", {"fresh": 7})
    vae = DEFAULT_MODEL_DIR / CHECKPOINT_NAME
    monkeypatch.setattr(stages, "stage_vae", lambda work: vae)
    data = np.load(stages.stage_data(tmp_path, "fresh"))
    assert data["images"].shape == (3, stages.IMAGE_SIZE, stages.IMAGE_SIZE, 3)
    for k in range(3):
        scene = make_scene(scene_rng(stages.SEEDS["train"], 7 + k), size=stages.IMAGE_SIZE)
        assert np.array_equal(data["images"][k], np.asarray(scene.image))
        captions = [s for i, p, s in zip(data["scene"], data["prefix"], data["suffix"]) if i == k and p == "caption en"]
        assert captions == [caption(scene)]
    assert sorted(set(data["scene"].tolist())) == [0, 1, 2]
