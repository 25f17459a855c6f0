"""The `nanopali` command: help, a caption streamed from a checkpoint, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_checkpoint import write_tiny_checkpoint
from nanopali import PaliGemma, Processor, stream
from nanopali.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), generation=1)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "nanopali.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("caption", "answer", "generate"):
        assert command in out


@pytest.mark.parametrize("args, prompt", [(["caption"], "caption en"),
                                          (["answer", "{image}", "what color is it?"], "answer en what color is it?")])
def test_command_prints_what_stream_produces(checkpoint, image_file, capsys, args, prompt):
    argv = [args[0], "--model", str(checkpoint), "--dtype", "float32", "--max-new-tokens", "8"]
    argv += [str(image_file)] + args[2:] if len(args) > 1 else [str(image_file)]
    assert main(argv) == 0
    expected = "".join(stream(PaliGemma.from_pretrained(checkpoint), Processor.from_pretrained(checkpoint),
                              image_file, prompt, max_new_tokens=8))
    assert capsys.readouterr().out == expected + "\n"


def test_beams_from_the_command_line(checkpoint, image_file, capsys):
    assert main(["generate", "--model", str(checkpoint), "--dtype", "float32", "--beams", "2", "--max-new-tokens", "5",
                 str(image_file), "detect cat"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("problem", ["missing image", "missing model"])
def test_errors_are_one_clear_line(checkpoint, image_file, tmp_path, capsys, problem):
    model, image = str(checkpoint), str(image_file)
    if problem == "missing image":
        image = str(tmp_path / "nope.jpg")
    else:
        model = str(tmp_path / "no-model")
    assert main(["caption", "--model", model, image]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanopali: error:") and ("nope.jpg" in err or "no-model" in err)
