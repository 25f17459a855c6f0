"""The contrastive pipeline and CLI on a tiny random SigLIP checkpoint: classify and search against transformers'
SiglipModel + SiglipProcessor on the same files, the embedding cache, and the bad inputs (API and CLI)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _spm
import numpy as np
import pytest
import torch
from PIL import Image
from siglip_reference import write_checkpoint

import nanopali
from nanopali.errors import UsageError
from nanopali.inputs.siglip_processor import TextTruncatedWarning

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["a red circle", "two blue squares", "a yellow star", "the word rain"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    return folder, write_checkpoint(folder)


@pytest.fixture(scope="module")
def clip(checkpoint):
    return nanopali.load_contrastive(checkpoint[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        size = tuple(int(s) for s in rng.integers(20, 60, 2))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def reference_logits(checkpoint, images, texts):
    folder, hf = checkpoint
    proc = _spm.hf_siglip_processor(folder)
    batch = proc(images=images, text=texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits_per_image


def test_classify_equals_transformers(checkpoint, clip, images):
    files = sorted(images.glob("*.png"))[:2]
    pil = [Image.open(f).convert("RGB") for f in files]
    want = reference_logits(checkpoint, pil, [f"a photo of {x}." for x in LABELS]).sigmoid()
    got = clip.classify(files, LABELS, template="a photo of {}.")
    for row, ranked in zip(want, got):
        assert [p for _, p in ranked] == sorted([p for _, p in ranked], reverse=True)
        assert dict(ranked) == pytest.approx(dict(zip(LABELS, row.tolist())), rel=1e-4)
    assert clip.classify(str(files[0]), "a red circle, a yellow star")[0][0] in ("a red circle", "a yellow star")


def test_a_siglip2_checkpoint_classifies_as_transformers(tmp_path):
    """SigLIP 2's fixed-resolution checkpoints: the same model with a Gemma tokenizer (lower-casing, <eos>)."""
    model = write_checkpoint(tmp_path, variant="siglip2-lower-eos", seed=1)
    clip = nanopali.load_contrastive(tmp_path)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    labels = ["A Red Circle", "two BLUE squares", "a yellow star"]
    want = reference_logits((tmp_path, model), [image], labels)[0].sigmoid()
    assert dict(clip.classify(image, labels)) == pytest.approx(dict(zip(labels, want.tolist())), rel=1e-4)


def test_embeddings_are_normalized_features(checkpoint, clip, images):
    files = sorted(images.glob("*.png"))
    emb = clip.embed_images(files)
    assert emb.shape == (5, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(5))
    text = clip.embed_texts(LABELS)
    logits = clip.logits(emb, text)
    want = reference_logits(checkpoint, [Image.open(f).convert("RGB") for f in files], LABELS)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


def test_search_ranks_by_similarity_and_caches(clip, images, tmp_path):
    folder = tmp_path / "search"
    shutil.copytree(images, folder)
    hits = clip.search(folder, "a red circle", top_k=None)
    files = sorted(folder.glob("*.png"))
    cos = (clip.embed_images(files) @ clip.embed_texts(["a red circle"]).T)[:, 0]
    assert [p for p, _, _ in hits] == [files[i] for i in cos.argsort(descending=True).tolist()]
    assert [c for _, _, c in hits] == pytest.approx(sorted(cos.tolist(), reverse=True), abs=1e-6)
    assert (folder / "nanopali-embeddings.npy").is_file() and (folder / "nanopali-embeddings.json").is_file()
    calls = []
    original = clip.embed_images
    clip.embed_images = lambda imgs: calls.append(len(imgs)) or original(imgs)
    try:
        assert clip.search(folder, "a red circle", top_k=2) == hits[:2]  # all five from the cache
        Image.new("RGB", (9, 9), "red").save(files[0])                   # one file changes
        changed = clip.search(folder, "a red circle", top_k=None)
    finally:
        del clip.embed_images
    assert calls == [1]
    assert {p for p, _, _ in changed} == set(files)


def test_bad_inputs(clip, images, tmp_path):
    with pytest.raises(UsageError, match="no labels"):
        clip.classify(images / "img0.png", " , ,")
    with pytest.raises(UsageError, match="given twice"):
        clip.classify(images / "img0.png", ["cat", "cat"])
    with pytest.raises(UsageError, match="one {}"):
        clip.classify(images / "img0.png", ["cat"], template="a photo")
    with pytest.warns(TextTruncatedWarning, match="cut to 16"):
        clip.classify(images / "img0.png", ["word " * 30, "cat"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        clip.search(tmp_path / "empty", "cat")
    with pytest.raises(UsageError, match="not a directory"):
        clip.search(images / "img0.png", "cat")


def cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "nanopali", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_classify_and_search(checkpoint, clip, images, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    image = str(folder / "img1.png")
    run = cli("classify", image, ", ".join(LABELS), "--model", str(checkpoint[0]), "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["probability"] == "sigmoid"
    want = clip.classify(image, LABELS)
    assert [(r["label"], pytest.approx(r["probability"], rel=1e-4)) for r in result["labels"]] == want
    run = cli("classify", image, ", ".join(LABELS), "--model", str(checkpoint[0]))
    assert run.returncode == 0 and len(run.stdout.splitlines()) == len(LABELS) and want[0][0] in run.stdout.splitlines()[0]
    run = cli("search", str(folder), "two blue squares", "--model", str(checkpoint[0]), "--top-k", "3", "--json")
    assert run.returncode == 0, run.stderr
    hits = json.loads(run.stdout)["results"]
    assert [h["image"] for h in hits] == [str(p) for p, _, _ in clip.search(folder, "two blue squares", top_k=3)]


@pytest.mark.parametrize("args, message", [
    (("classify", "{image}", ""), "no labels"),
    (("classify", "{image}", " ,  , "), "no labels"),
    (("classify", "{missing}", "cat"), "does not exist"),
    (("classify", "{image}", "cat", "--template", "a photo"), "one {}"),
    (("search", "{empty}", "cat"), "holds no images"),
    (("search", "{image}", "cat"), "not a directory"),
    (("search", "{folder}", "cat", "--top-k", "0"), "--top-k 0"),
    (("search", "{folder}", "  "), "non-empty"),
    (("classify", "{image}", "cat", "--model", "{empty}"), "no config.json"),
])
def test_cli_bad_inputs_are_one_line(checkpoint, images, tmp_path, capsys, args, message):
    """In-process main() (the real console script runs above): exit status 2 and one line naming the problem."""
    from nanopali.cli import main

    (tmp_path / "empty").mkdir()
    values = dict(image=str(images / "img0.png"), missing=str(tmp_path / "nope.png"), empty=str(tmp_path / "empty"),
                  folder=str(images))
    argv = [a.format(**values) for a in args] + ([] if "--model" in args else ["--model", str(checkpoint[0])])
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanopali: error: "), lines
    assert re.search(message, lines[0]), lines[0]


def test_cli_notes_a_truncated_label(checkpoint, images):
    run = cli("classify", str(images / "img0.png"), "cat, " + "word " * 30, "--model", str(checkpoint[0]))
    assert run.returncode == 0, run.stderr
    assert "nanopali: note: text 1" in run.stderr and "cut to 16" in run.stderr
