"""world_eval: held-out toy-world metrics, checked with scripted models whose right answer we know."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_checkpoint import write_tiny_checkpoint

import nanopali
from nanopali.tasks import parse_objects
from nanopali.world.eval import TASKS, detection_map50, evaluate_world, task_of
from nanopali.world.examples import description, examples
from nanopali.world.scenes import COLORS, POSITIONS, SHAPES, make_scene, scene_rng

VAE_PATH = Path(__file__).resolve().parent / "fixtures" / "vqvae" / "vae-random.npz"
N, SEED, SIZE = 12, 5, 128


class MemoryVAE:
    """A lossless stand-in for the mask VQ-VAE: encode remembers each 64x64 crop and names it by its indices."""

    def __init__(self):
        self.index, self.crops = {}, []

    def encode(self, masks):
        out = []
        for m in torch.as_tensor(masks):
            k = self.index.setdefault(m.numpy().tobytes(), len(self.index))
            if k == len(self.crops):
                self.crops.append(m.clone())
            out.append([k // 128, k % 128] + [0] * 14)
        return torch.tensor(out)

    def decode(self, indices):  # logits > 0 where the remembered crop is > 0.5
        return torch.stack([self.crops[a * 128 + b] - 0.5 for a, b, *_ in torch.as_tensor(indices).tolist()])


def scenes(n=N, seed=SEED, vae=None):
    out = []
    for i in range(n):
        rng = scene_rng(seed, i)
        scene = make_scene(rng, size=SIZE)
        out.append((scene, examples(scene, rng, vae)))
    return out


class Scripted:
    """Stands in for nanopali.Pali: answers each (image, prompt) with answer(true suffix, prompt), a text or
    (text, [((start, end), logprob)]) as Pali.generate_spans gives."""

    def __init__(self, answer, vae=None, n=N, seed=SEED):
        self.vae, self.answer, self.batches = vae, answer, []
        self.truth = {(s.image.tobytes(), ex["prefix"]): ex["suffix"] for s, exs in scenes(n, seed, vae) for ex in exs}

    def generate_spans(self, images, prompts, task, max_new_tokens):
        self.batches.append(list(prompts))
        answers = [self.answer(self.truth[im.tobytes(), p], p) for im, p in zip(images, prompts)]
        return [a if isinstance(a, tuple) else (a, []) for a in answers]  # (text, token spans)


def shift_boxes(suffix, prompt):
    """Every box moved sideways by half its width (IoU 1/3 with the original): right, or left at the edge."""
    out = []
    for obj in parse_objects(suffix, image_size=(1023, 1023)):  # 1023 px: pixels are the loc bins
        y0, x0, y1, x1 = obj.locs
        dx = (x1 - x0) // 2 * (1 if x1 + (x1 - x0) // 2 <= 1023 else -1)
        out.append("".join(f"<loc{v:04d}>" for v in (y0, x0 + dx, y1, x1 + dx)) + " " + obj.label)
    return " ; ".join(out)


def wrong(suffix, prompt):
    """A wrong answer of the right kind for every task."""
    task = task_of(prompt)
    if task == "detect":
        return shift_boxes(suffix, prompt)
    if task == "vqa/how many":
        return str(int(suffix) + 1)
    for names in (list(COLORS), SHAPES, POSITIONS):
        if suffix in names:
            return names[(names.index(suffix) + 1) % len(names)]
    return suffix + " and a cat" if task == "caption" else suffix.upper()


@pytest.fixture(scope="module")
def oracle_run():
    pali = Scripted(lambda suffix, prompt: " " + suffix, vae=MemoryVAE())
    return pali, *evaluate_world(pali, n_scenes=N, seed=SEED, size=SIZE, batch_size=8, return_records=True)


def test_task_of_names_the_question_type():
    assert task_of("answer en where is the red circle?") == "vqa/where"
    assert task_of("answer en how many stars are there?") == "vqa/how many"
    assert task_of("answer en what color is the star?") == "vqa/what color"
    assert task_of("detect star ; circle") == "detect" and task_of("ocr") == "ocr"


def test_ground_truth_boxes_are_what_the_detect_suffix_encodes():
    for scene, exs in scenes():
        ex = next(e for e in exs if e["prefix"].startswith("detect "))
        labels = ex["prefix"][len("detect "):].split(" ; ")
        truth = sorted((o.shape, o.box) for s in labels for o in scene.objects if o.shape == s)
        parsed = sorted((o.label, o.box) for o in parse_objects(ex["suffix"], image_size=scene.size))
        assert [s for s, _ in parsed] == [s for s, _ in truth]
        assert all(np.abs(np.subtract(a, b)).max() <= 1 for (_, a), (_, b) in zip(parsed, truth))


def test_oracle_scores_one_everywhere(oracle_run):
    pali, metrics, records = oracle_run
    for key in ("vqa/how many", "vqa/what color", "vqa/what shape", "vqa/where", "vqa/accuracy",
                "caption/exact_match", "ocr/exact_match", "detect/map50"):
        assert metrics[key] == 1.0, key
    for task in TASKS:
        assert metrics[f"n/{task}"] > 0, task
    assert metrics["n/detect"] == metrics["n/caption"] == N
    assert len(records) == sum(metrics[f"n/{t}"] for t in TASKS)
    assert {r["task"] for r in records} >= {"caption", "detect", "segment", "ocr", "vqa/where"}
    # batched by task: each batch at most batch_size prompts of one task
    assert all(len(b) <= 8 and len({task_of(p).split("/")[0] for p in b}) == 1 for b in pali.batches)
    assert len(pali.batches) == sum(math.ceil(metrics[f"n/{t}"] / 8) for t in TASKS)


def test_segment_miou_is_the_iou_of_the_decoded_mask_with_the_visible_mask(oracle_run):
    pali, metrics, records = oracle_run
    by_hand = []
    for scene, exs in scenes(vae=pali.vae):
        for ex in (e for e in exs if e["prefix"].startswith("segment ")):
            obj = next(o for o in scene.objects if description(o, scene.objects) == ex["prefix"][8:])
            mask = parse_objects(ex["suffix"], image_size=scene.size, vae=pali.vae)[0].mask
            by_hand.append((mask & obj.mask).sum() / (mask | obj.mask).sum())
    assert len(by_hand) == metrics["n/segment"]
    assert metrics["segment/miou"] == pytest.approx(np.mean(by_hand))
    assert 0.8 < metrics["segment/miou"] < 1.0  # a lossless VAE still loses a little in the 64x64 round trip


def test_wrong_answers_score_zero():
    pali = Scripted(wrong)
    metrics = evaluate_world(pali, n_scenes=N, seed=SEED, size=SIZE, tasks=("vqa", "caption", "detect", "ocr"))
    assert metrics["detect/map50"] == 0.0  # every box has IoU 1/3 with its truth
    for key in ("vqa/accuracy", "caption/exact_match", "ocr/exact_match"):
        assert metrics[key] == 0.0, key


def test_map50_of_some_shifted_detections_is_the_recall_of_the_rest():
    """Every other detect answer shifted (misses, IoU ~1/3) and given a lower probability than the hits: per
    shape, precision is 1 up to the recall of the hits, so AP is the share of the 101 recall points below it."""
    flip = {}

    def answer(suffix, prompt):
        flip[prompt] = not flip.get(prompt, True)  # alternate per prompt text
        text = shift_boxes(suffix, prompt) if flip[prompt] else suffix
        return text, [((0, len(text)), -1.0 if flip[prompt] else -0.1)]  # the object scores: e^-1 and e^-0.1

    metrics, records = evaluate_world(Scripted(answer), n_scenes=N, seed=SEED, size=SIZE, tasks=("detect",),
                                      return_records=True)
    assert set(metrics) == {"n/detect", "detect/map50"}
    scores = [r["score"] for r in records]
    assert all(s > 0.85 or 0.25 < s < 0.4 for s in scores) and min(scores) < 0.4 < 0.85 < max(scores)
    found, total = {}, {}
    for r in records:
        for obj in parse_objects(r["truth"], image_size=(SIZE, SIZE)):
            total[obj.label] = total.get(obj.label, 0) + 1
            found[obj.label] = found.get(obj.label, 0) + (r["score"] > 0.85)
    ap = [np.mean(np.linspace(0, 1, 101) <= found[s] / total[s] + 1e-12) for s in total]
    assert metrics["detect/map50"] == pytest.approx(np.mean(ap))
    assert 0.0 < metrics["detect/map50"] < 1.0


def test_empty_and_garbage_answers_score_zero_without_crashing():
    for text in ("", "<loc0001> ; <seg999>", "nothing here"):
        pali = Scripted(lambda suffix, prompt: text, vae=MemoryVAE())
        metrics = evaluate_world(pali, n_scenes=4, seed=SEED, size=SIZE)
        scores = {k: v for k, v in metrics.items() if not k.startswith("n/")}
        assert "detect/map50" in scores and "segment/miou" in scores
        assert all(v == 0.0 for v in scores.values()), (text, scores)


def test_detection_map50_follows_the_scores():
    box, far = (10, 10, 30, 30), (60, 60, 80, 80)
    sizes, truths = [(100, 100)] * 2, [[("circle", box)], [("circle", box)]]
    # one hit, one miss: the 101-point interpolated precision is 1 (hit ranked first) or 0.5 up to recall 0.5
    assert detection_map50(sizes, truths, [[("circle", box, 0.9)], [("circle", far, 0.5)]]) == pytest.approx(51 / 101)
    assert detection_map50(sizes, truths, [[("circle", box, 0.5)], [("circle", far, 0.9)]]) == pytest.approx(51 / 202)
    assert detection_map50(sizes, truths, [[("circle", box, 0.9)], []]) == pytest.approx(51 / 101)
    assert detection_map50(sizes, truths, [[("circle", box, 1.0), ("blob", box, 1.0)], [("circle", box, 1.0)]]) == 1.0
    assert detection_map50(sizes, truths, [[], [("star", box, 1.0)]]) == 0.0  # wrong class
    assert detection_map50(sizes, truths, [[], []]) == 0.0


def test_task_filter_and_unknown_task():
    pali = Scripted(lambda suffix, prompt: suffix)
    metrics = evaluate_world(pali, n_scenes=3, seed=SEED, size=SIZE, tasks=("ocr", "caption"))
    assert {p.split()[0] for b in pali.batches for p in b} <= {"ocr", "caption"}
    assert set(metrics) <= {"n/ocr", "n/caption", "ocr/exact_match", "caption/exact_match"}
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluate_world(pali, n_scenes=1, tasks=("answer",))


def test_runs_on_a_tiny_random_checkpoint(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "tiny", generation=2)
    shutil.copy(VAE_PATH, path / "vae-oid.npz")
    pali = nanopali.load(path)
    metrics = evaluate_world(pali, n_scenes=2, seed=SEED, size=SIZE, batch_size=4, max_new_tokens=6)
    assert metrics["n/caption"] == 2 and metrics["n/detect"] == 2 and metrics["n/segment"] > 0
    for key in ("caption/exact_match", "vqa/accuracy", "detect/map50", "segment/miou"):
        assert 0.0 <= metrics[key] <= 1.0, key
