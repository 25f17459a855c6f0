"""The shipped default model really works: held-out scores above floors, boxes and masks on the objects.

The floors sit a little under the model card's numbers (nanopali/default_model/README.md, 1000 scenes of
seed 3); here a fresh sample of seed 4 (training used seed 2), so a fake model or a broken pipeline fails.
"""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import nanopali
from nanopali import cli, prepare
from nanopali.inference import native
from nanopali.inference.quantize import load_quantized
from nanopali.paths import DEFAULT_MODEL_DIR, default_model_dir
from nanopali.pipeline import Pali
from nanopali.world.eval import evaluate_world
from nanopali.world.examples import caption
from nanopali.world.scenes import COLORS, NUMBERS, make_scene, scene_rng

ROOT = Path(__file__).resolve().parents[1]
# The card's numbers (seed 3, 1000 scenes) minus a margin for a 100-scene sample (about 2.5 standard errors);
# each floor is far above what answering from the priors alone gives (colour 1/8, shape 1/7, where 1/9, a word
# 1/25, no boxes or masks). Captions are also scored without the ' with the word "…"' clause (card: 88.2 %).
# Measured on this sample (the eleven-cycle model): how many 96.7, colour 100, shape 98.3, where 96.9 %, mAP 0.96,
# mIoU 88.5 %, captions 82 % (84 % without the word), OCR 95.8 % of 48. The caption floors sit under the seed
# never used to choose (seed 11: 82.9 %) rather than the card's 86.2 %.
FLOORS = {"vqa/how many": 0.92, "vqa/what color": 0.95, "vqa/what shape": 0.94, "vqa/where": 0.93,
          "detect/map50": 0.88, "segment/miou": 0.80, "caption/exact_match": 0.72, "caption/without_word": 0.75,
          "ocr/exact_match": 0.83}
FLOORS_OVERLAP = {"detect": 0.92, "segment": 0.93}  # share of examples whose boxes / mask overlap the truth > 0.5
N_SCENES = 100


@pytest.fixture(scope="module")
def evaluated():
    assert (DEFAULT_MODEL_DIR / "config.json").is_file(), f"the default model is missing from {DEFAULT_MODEL_DIR}"
    metrics, records = evaluate_world(nanopali.load(), n_scenes=N_SCENES, seed=4, return_records=True)
    captions = [r for r in records if r["task"] == "caption"]
    metrics["caption/without_word"] = np.mean([_without_word(r["prediction"]) == _without_word(r["truth"]) for r in captions])
    return metrics, records


def _without_word(caption: str) -> str:
    return re.sub(r' with the word "[^"]*"', "", caption.strip())


@pytest.mark.parametrize("metric", sorted(FLOORS))
def test_held_out_scores_clear_the_floors(evaluated, metric):
    metrics, _ = evaluated
    assert metrics[metric] >= FLOORS[metric], f"{metric} = {metrics[metric]:.3f} < floor {FLOORS[metric]}"


def test_the_sample_is_big_enough_and_covers_every_task(evaluated):
    metrics, _ = evaluated
    for task in ("caption", "detect", "segment", "ocr", "vqa/how many", "vqa/what color", "vqa/what shape", "vqa/where"):
        assert metrics[f"n/{task}"] >= 30, task


def test_detections_and_masks_land_on_the_objects(evaluated):
    _, records = evaluated
    for task in ("detect", "segment"):  # per example: mean best box IoU / mask IoU with the true objects
        scores = np.array([r["score"] for r in records if r["task"] == task])
        assert np.mean(scores > 0.5) >= FLOORS_OVERLAP[task], (task, np.mean(scores > 0.5))


def _example_captions(n: int) -> list[str]:
    """True captions of examples/world-<i>.png (world/recipe/data.write_examples: seed 5, a word, 2+ objects)."""
    truths, i = [], 0
    while len(truths) < n:
        scene = make_scene(scene_rng(5, i), size=128)
        i += 1
        if scene.word and len(scene.objects) >= 2:
            truths.append(caption(scene))
    return truths


def _colours(text: str) -> Counter:
    """The colours a world caption names, with their counts: "two red crosses and a blue star" -> red 2, blue 1."""
    words = text.replace(",", " ").split()
    return Counter(
        w for k, w in enumerate(words) if w in COLORS
        for _ in range(NUMBERS.index(words[k - 1]) if k and words[k - 1] in NUMBERS else 1))


def test_the_readme_command_captions_the_example_images(capsys):
    """`nanopali caption examples/world-<i>.png`, no --model, as the README's first command (bf16, the CLI
    default). The README shows world-0's caption right but for the word (misread); across the examples, most
    captions name exactly the true colours, counted."""
    images = sorted((ROOT / "examples").glob("world-*.png"))
    assert len(images) >= 4
    first = subprocess.run([sys.executable, "-m", "nanopali", "caption", str(images[0])], capture_output=True,
                           text=True, check=True)  # the command itself, once
    answers = [first.stdout.strip()]
    for image in images[1:]:
        assert cli.main(["caption", str(image), "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out)["text"])
    truths = _example_captions(len(images))
    assert _without_word(answers[0]) == _without_word(truths[0]), (answers[0], truths[0])
    assert sum(_colours(a) == _colours(t) for a, t in zip(answers, truths)) >= len(images) / 2, list(zip(answers, truths))


def test_colour_counting_helper():
    assert _colours('two red crosses, a blue star and a red circle with the word "cat"') == Counter(red=3, blue=1)


def test_quantized_default_model_answers_like_the_unquantized_one():
    """int8 / int4 (quantize.py) on trained weights, where random-weight checks say little: the same greedy
    answers as the unquantized model (fp32, nanopali.load's default) for nearly every example of a small
    held-out sample, and the same VQA accuracy within a few examples. (Measured on these 15 scenes, 213
    answers: int8 99.5 %, int4 95.3 %, int8 with int8 activations (W8A8) 99.5 % identical; #25 asks W8A8 >= 99 %.)"""
    def run(pali, batch_size=32):
        return evaluate_world(pali, n_scenes=15, seed=4, batch_size=batch_size, return_records=True)
    unquantized = nanopali.load()
    (m_float, r_float), (m8, r8), (m4, r4) = (run(unquantized), run(nanopali.load(quantize="int8")),
                                              run(nanopali.load(quantize="int4")))
    # int8 weights with int8 activations (native.py's W8A8, as llama.cpp's q8_0): forced, as the small model would not
    # time its steps; batches of 16 rows, so every decode step takes it (the prefill dequantizes)
    assert native.available(), "native.py's kernels did not build: the W8A8 answers would not be W8A8's"
    model = load_quantized(default_model_dir(), "int8", dtype=torch.float32)
    w8a8 = Pali(model, unquantized.processor, unquantized.vae, runtime=prepare(model, force_path="native"))
    m88, r88 = run(w8a8, batch_size=16)
    for name, (m, r), floor in (("int8", (m8, r8), 0.95), ("int4", (m4, r4), 0.80), ("w8a8", (m88, r88), 0.99)):
        assert [x["prefix"] for x in r] == [x["prefix"] for x in r_float]
        same = np.mean([a["prediction"] == b["prediction"] for a, b in zip(r, r_float)])
        assert same >= floor, f"{name}: {same:.1%} of the answers equal the unquantized model's"
        assert abs(m["vqa/accuracy"] - m_float["vqa/accuracy"]) <= 0.05, (name, m["vqa/accuracy"], m_float["vqa/accuracy"])
