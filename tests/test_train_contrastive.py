"""Contrastive training with the project's trainer (`--objective siglip|clip`) on a tiny random SigLIP: the first
step's loss is the model's own loss of that batch, it learns a small set, checkpoints load in transformers,
held-out retrieval metrics are logged, a SIGTERM-interrupted run resumes bit for bit, 2 torchrun processes (DDP
and FSDP2) give the weights of one process on the same global batch, and the options that cannot apply are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from siglip_reference import write_checkpoint
from test_distributed import torchrun
from test_train import InterruptAt, assert_same_training
from transformers import SiglipModel

from nanopali import SigLIP, SigLIPProcessor
from nanopali.errors import ConfigError, DataError, UsageError
from nanopali.train import TrainConfig, TrainingInterrupted, fit
from nanopali.train.data import JsonlDataset, PAIR_FIELDS

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle", "a blue square", "two green stars", "a yellow triangle", "the word rain",
         "a white diamond", "three crosses", "an orange hexagon"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SigLIP checkpoint with the from-scratch initialisation (the paper's temperature and bias)."""
    folder = tmp_path_factory.mktemp("siglip")
    write_checkpoint(folder)
    torch.manual_seed(0)
    SigLIP.from_pretrained(folder).init_weights().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Eight pairs, each image a flat colour with noise, each with a text and a label (its first two words)."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    lines = []
    for i, text in enumerate(TEXTS):
        pixels = np.clip(rng.integers(0, 256, 3)[None, None] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": text, "label": " ".join(text.split()[:2])}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def options(base, data, out, **kw) -> dict:
    return {**dict(model=str(base), data=str(data), out=str(out), objective="siglip", steps=4, batch_size=4, lr=3e-3,
                   warmup_steps=1, seed=1, save_every=2, keep_checkpoints=5), **kw}


def weights(path):
    return SigLIP.from_pretrained(path).state_dict()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    fit(TrainConfig(**options(base, data, out, batch_size=4, eval=str(data))))
    return out


def test_first_step_loss_is_the_models_loss_of_that_batch(base, data, single):
    """The trainer's data order (seed 1) and loss: its first logged loss is SigLIP.forward's return_loss on the
    four pairs it drew, computed here independently of the trainer."""
    pairs = list(JsonlDataset(data, fields=PAIR_FIELDS))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1)).tolist()[:4]
    model, processor = SigLIP.from_pretrained(base), SigLIPProcessor.from_pretrained(base)
    batch = processor(images=[pairs[i].image for i in order], texts=[pairs[i].text for i in order])
    with torch.no_grad():
        want = model(**batch, return_loss=True).loss.item()
    assert metrics(single)[0]["loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("objective", ["siglip", "clip"])
def test_learns_the_pairs_and_saves_what_transformers_loads(base, data, tmp_path, objective):
    out = tmp_path / objective
    final = fit(TrainConfig(**options(base, data, out, objective=objective, steps=40, batch_size=8, lr=5e-3,
                                      warmup_steps=4, save_every=0, eval=str(data))))
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.3 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    held_out = rows[-1]
    assert held_out["eval/i2t/recall@1"] == 1.0 and held_out["eval/t2i/recall@1"] == 1.0, held_out
    assert held_out["eval/i2t/recall@5"] == 1.0 and "eval/zero_shot/accuracy" in held_out
    assert json.loads((final / "config.json").read_text())["objective"] == objective
    ours, hf = SigLIP.from_pretrained(final).eval(), SiglipModel.from_pretrained(final).eval()
    batch = SigLIPProcessor.from_pretrained(final)(images=[data.parent / "0.png", data.parent / "1.png"], texts=TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits_per_image, hf(**batch).logits_per_image, rtol=1e-4, atol=1e-5)
        probs = ours.probabilities(ours(**batch).logits_per_image)
    if objective == "clip":
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert probs.argmax(-1).tolist() == [0, 1]


def test_interrupted_and_resumed_equals_uninterrupted(base, data, single, tmp_path):
    pairs = [{"image": p.image, "text": p.text} for p in JsonlDataset(data, fields=PAIR_FIELDS)]
    out = tmp_path / "resumed"
    config = {**options(base, data, out), "data": None}
    with pytest.raises(TrainingInterrupted) as stop:
        fit(TrainConfig(**config), train_data=InterruptAt(pairs, at=9))  # SIGTERM while collecting step 3
    assert stop.value.step == 3 and stop.value.checkpoint.name == "checkpoint-000003"
    fit(TrainConfig(**config, resume=True), train_data=pairs)
    a, b = weights(single / "checkpoint-000004"), weights(out / "checkpoint-000004")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_process_on_the_global_batch(base, data, single, tmp_path, fsdp):
    """batch_size 2 per process x 2 processes = the single run's 4: the ring loss spans both processes' pairs."""
    out = torchrun(tmp_path, options(base, data, tmp_path / "run", batch_size=2, fsdp=fsdp, eval=str(data)))
    assert_same_training(weights(single / "checkpoint-000004"), weights(out / "checkpoint-000004"))
    for a, b in zip(metrics(single), metrics(out), strict=True):
        for key in ("loss", "grad_norm", "eval/i2t/recall@1"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), f"step {a['step']}: {key}"


@pytest.mark.parametrize("change, message", [
    (dict(grad_accum=2), "accumulating micro-batches would change the loss"),
    (dict(lora_rank=4), "LoRA adapts PaliGemma's decoder"),
    (dict(recipe="attention-only"), "must be one of full, freeze-vision, freeze-vision-encoder, freeze-text for --objective siglip"),
    (dict(label_smoothing=0.1), "applies to --objective suffix"),
    (dict(objective="contrastive"), "one of suffix, siglip, clip"),
])
def test_options_that_cannot_apply_are_refused(base, data, tmp_path, change, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(**options(base, data, tmp_path / "x", **change))


def test_the_wrong_model_or_data_is_named(base, data, tmp_path):
    from tiny_checkpoint import write_tiny_checkpoint

    pali = write_tiny_checkpoint(tmp_path / "pali", generation=1)
    with pytest.raises((ConfigError, Exception), match="spiece.model|expected 'siglip'"):
        fit(TrainConfig(**options(pali, data, tmp_path / "a")))
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": str(data.parent / "0.png"), "prefix": "caption en", "suffix": "x"}) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl:1: missing or non-string field\(s\) \['text'\]"):
        fit(TrainConfig(**options(base, captions, tmp_path / "b")))


def test_long_texts_are_counted_and_reported(base, data, tmp_path, capfd):
    long = data.parent / "long.jsonl"  # beside the images its lines name
    long.write_text(data.read_text() + json.dumps({"image": str(data.parent / "0.png"), "text": "word " * 40}) + "\n")
    fit(TrainConfig(**options(base, long, tmp_path / "run", steps=1, save_every=0)))
    assert "1 texts are longer than the text tower's 16 tokens and are cut" in capfd.readouterr().err
    assert metrics(tmp_path / "run")[0]["truncated_texts"] == 1


def test_bf16_autocast_trains_close_to_float32(base, data, single, tmp_path):
    fit(TrainConfig(**options(base, data, tmp_path / "bf16", bf16=True)))
    fp32, bf16 = ([r["loss"] for r in metrics(out) if "loss" in r] for out in (single, tmp_path / "bf16"))
    assert bf16 != fp32, "autocast had no effect"
    for a, b in zip(fp32, bf16):
        assert abs(a - b) < 0.05 * a


@pytest.mark.parametrize("recipe, moving", [
    ("freeze-vision", ("text_model.", "logit_")),
    ("freeze-vision-encoder", ("text_model.", "logit_", "vision_model.head.")),
    ("freeze-text", ("vision_model.", "logit_")),
])
def test_recipes_train_exactly_what_they_name(base, data, tmp_path, recipe, moving):
    final = fit(TrainConfig(**options(base, data, tmp_path / recipe, recipe=recipe, steps=2, save_every=0)))
    before, after = weights(base), weights(final)
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith(moving), f"{recipe}: {k} {'moved' if changed else 'did not move'}"
