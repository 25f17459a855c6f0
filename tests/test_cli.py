"""The `nanopali` console script, run for real in subprocesses on a tiny checkpoint built here."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoint import write_tiny_checkpoint

from nanopali import PaliGemma, Processor, stream

VAE = Path(__file__).resolve().parent / "fixtures" / "vqvae" / "vae-random.npz"
SCRIPT = shutil.which("nanopali")


def cli(*args, stdin: str | None = None):
    assert SCRIPT, "the nanopali console script is not installed (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, input=stdin, env=env, timeout=120)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), generation=1)
    shutil.copy(VAE, path / "vae-oid.npz")
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_help_and_module_entry_point():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("caption", "answer", "detect", "segment", "ocr", "generate", "chat", "info", "convert", "train", "serve",
                    "classify", "search"):
        assert command in out.stdout
    module = subprocess.run([sys.executable, "-m", "nanopali", "detect", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "--out" in module.stdout and "--no-json" in module.stdout


def test_caption_streams_what_the_python_api_streams(model, image):
    out = cli("caption", image, "--model", model, "--dtype", "float32", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    expected = "".join(stream(PaliGemma.from_pretrained(model), Processor.from_pretrained(model), image, "caption en",
                              max_new_tokens=8))
    assert out.stdout == expected + "\n"


def test_answer_json(model, image):
    out = cli("answer", image, "what color is it?", "--model", model, "--dtype", "float32", "--json", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["task"] == "answer" and result["prompt"] == "answer en what color is it?"
    assert isinstance(result["text"], str) and result["new_tokens"] <= 4 and result["seconds"] > 0


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_objects_json_and_drawing(model, image, tmp_path, task):
    out = cli(task, image, "cat ; dog", "--model", model, "--dtype", "float32", "--json", "--out", tmp_path / "o.png",
              "--max-new-tokens", "24", "--temperature", "1.0", "--seed", "3")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["labels"] == ["cat", "dog"] and set(result) >= {"objects", "dropped", "text"}
    assert all(set(o) >= {"label", "box", "score"} for o in result["objects"])
    assert all(d["reason"] for d in result["dropped"])
    drawn = Image.open(tmp_path / "o.png")
    assert drawn.size == (60, 50)


def test_chat_answers_each_line(model, image):
    out = cli("chat", image, "--model", model, "--dtype", "float32", "--max-new-tokens", "3", stdin="caption en\nocr\n\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2


def test_info(model):
    out = cli("info", model, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    n = sum(p.numel() for p in PaliGemma.from_pretrained(model).parameters())
    assert info["parameters"] == n and info["dtypes"] == ["F32"] and info["generation"] == 1


def test_train_from_the_command_line(model, image, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"image": str(image), "prefix": "caption en", "suffix": "a photo"}) + "\n")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"steps": 2, "batch_size": 1, "lr": 1e-3}))
    out = cli("train", "--model", model, "--data", data, "--out", tmp_path / "run", "--config", config, "--steps", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("checkpoint-000003")
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("args, message", [
    (["caption", "{missing}", "--model", "{model}"], "nope.jpg"),
    (["caption", "{image}", "--model", "{missing_dir}"], "no-model"),
    (["segment", "{image}", "cat", "--model", "{model}", "--vae", "{missing_vae}"], "vae.npz"),
    (["train", "--data", "x.jsonl"], "train needs --model"),
    (["caption", "{image}", "--model", "{model}", "--compile"], "compile=True on the CPU"),
])
def test_user_mistakes_are_one_line_without_traceback(model, image, tmp_path, args, message):
    values = dict(model=model, image=image, missing=tmp_path / "nope.jpg", missing_dir=tmp_path / "no-model",
                  missing_vae=tmp_path / "vae.npz")
    out = cli(*[a.format(**values) for a in args])
    assert out.returncode == 2
    assert out.stderr.startswith("nanopali: error:") and message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unknown_task_is_a_usage_error():
    out = cli("describe", "x.png")
    assert out.returncode == 2 and "invalid choice: 'describe'" in out.stderr and "Traceback" not in out.stderr


def test_an_internal_error_keeps_its_traceback(model, image, monkeypatch):
    """Only a NanopaliError is a user mistake: any other exception (here a ValueError deep in caption) propagates."""
    from nanopali import cli
    from nanopali.pipeline import Pali

    def broken(self, *args, **kwargs):
        raise ValueError("boom")
    monkeypatch.setattr(Pali, "stream", broken)
    with pytest.raises(ValueError, match="boom"):
        cli.main(["caption", str(image), "--model", str(model), "--dtype", "float32", "--max-new-tokens", "2"])


def test_caption_and_help_never_import_training_the_world_or_the_server(model, image):
    code = ("import sys; from nanopali import cli; import nanopali.cli.tasks; cli._parser()\n"
            f"assert cli.main(['caption', {str(image)!r}, '--model', {str(model)!r}, '--dtype', 'float32', "
            "'--max-new-tokens', '2']) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith(('nanopali.train', 'nanopali.world', 'nanopali.serve', "
            "'fastapi', 'uvicorn'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_train_help_lists_every_training_option(capsys):
    from dataclasses import fields

    from nanopali import cli
    from nanopali.train import TrainConfig

    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--config" in out


def test_every_error_is_a_nanopali_error_and_keeps_its_builtin_base():
    import inspect

    from nanopali import config, errors
    from nanopali.inputs import images, tokenizer
    from nanopali.io import hf_checkpoint
    from nanopali.train import data

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 10 and all(issubclass(c, errors.NanopaliError) for c in classes)
    assert all(issubclass(c, (ValueError, FileNotFoundError)) for c in classes if c is not errors.NanopaliError)
    assert issubclass(errors.ImageNotFoundError, FileNotFoundError) and issubclass(errors.MissingFileError, FileNotFoundError)
    # the old import paths name the same classes
    assert config.ConfigError is errors.ConfigError and hf_checkpoint.CheckpointError is errors.CheckpointError
    assert images.ImageError is errors.ImageError and images.ImageNotFoundError is errors.ImageNotFoundError
    assert tokenizer.TokenizerError is errors.TokenizerError and data.DataError is errors.DataError
