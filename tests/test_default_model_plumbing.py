"""The shipped default model's plumbing: load() and the CLI without --model, its absence, and its packaging.

The real default model is swapped for a tiny checkpoint by pointing nanopali.paths.DEFAULT_MODEL_DIR at it.
"""

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoint import write_tiny_checkpoint

import nanopali
from nanopali import cli, paths

ROOT = Path(__file__).resolve().parents[1]
VAE = ROOT / "tests" / "fixtures" / "vqvae" / "vae-random.npz"
SHIPPED = ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
           "preprocessor_config.json", "vae-oid.npz", "README.md"]
FAST = ["--dtype", "float32", "--max-new-tokens", "4", "--json"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("default_model"), generation=1)
    shutil.copy(VAE, path / "vae-oid.npz")
    return path


@pytest.fixture
def default(checkpoint, monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    monkeypatch.setattr(paths, "DEFAULT_MODEL_DIR", checkpoint)
    return checkpoint


@pytest.fixture
def missing(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    monkeypatch.setattr(paths, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    return tmp_path / "default_model"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_load_without_a_path_is_the_default_model_with_its_vae(default, image):
    pali = nanopali.load()
    assert pali.model_dir == default and pali.vae is not None
    assert isinstance(pali.caption(image, max_new_tokens=3), str)


@pytest.mark.parametrize("command", [["caption"], ["segment", "cat"]])
def test_cli_tasks_without_model_use_the_default(default, image, capsys, command):
    assert cli.main([command[0], str(image), *command[1:], *FAST]) == 0  # segment: vae-oid.npz found beside it
    assert json.loads(capsys.readouterr().out)["task"] == command[0]


def test_info_without_a_directory_describes_the_default(default, capsys):
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_dir"] == str(default)


def test_a_missing_default_is_one_clear_error(missing, image, capsys):
    with pytest.raises(FileNotFoundError, match="installed without it"):
        nanopali.load()
    for argv in (["caption", str(image)], ["info"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nanopali: error: no default model at {missing}") and "--model" in err
        assert len(err.strip().splitlines()) == 1


def test_the_environment_variable_overrides_the_default(checkpoint, missing, monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_VAR, str(checkpoint))
    assert paths.default_model_dir() == checkpoint
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=f"{paths.ENV_VAR}=.*elsewhere"):
        paths.default_model_dir()


def test_wheel_and_sdist_ship_the_default_model_files(tmp_path):
    pytest.importorskip("setuptools", minversion="70.1")  # bdist_wheel built in
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "README.md", tmp_path)
    shutil.copytree(ROOT / "nanopali", tmp_path / "nanopali", ignore=shutil.ignore_patterns("__pycache__", "default_model"))
    shipped = tmp_path / paths.DEFAULT_MODEL_DIR.resolve().relative_to(ROOT)  # nanopali/world/default_model
    shipped.mkdir()
    for name in SHIPPED + ["notes.txt"]:
        (shipped / name).write_text("x")
    build = "from setuptools import build_meta as b; b.build_wheel('dist'); b.build_sdist('dist')"
    subprocess.run([sys.executable, "-c", build], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist()
    sdist = tarfile.open(next((tmp_path / "dist").glob("*.tar.gz"))).getnames()
    assert sorted(n.split("/")[-1] for n in wheel if "/default_model/" in n) == sorted(SHIPPED)  # notes.txt: not shipped
    assert {n.split("/")[-1] for n in sdist if "/default_model/" in n} >= set(SHIPPED)
