"""Bad generation options, model inputs, prompts and output paths: one clear error each, and valid ones still work.

Table-driven (issue 20): every CLI row asserts exit status 2 and exactly one `nanopali: error: …` line on stderr
naming the option or problem; every API row asserts a NanopaliError subclass and its message. The CLI runs in
this process (`nanopali.cli.main`) on a tiny checkpoint, except one row that needs real undecodable argv bytes.
"""

import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import image  # noqa: F401  (fixtures: the CLI tests' tiny checkpoint with a VQ-VAE, a photo)
from test_cli import model as model_dir  # noqa: F401

import nanopali
from nanopali import cli, generate
from nanopali.errors import MissingFileError, NanopaliError, UsageError
from nanopali.inference.generate import generate_tokens
from nanopali.inference.options import GenerationOptions

VAE = Path(__file__).resolve().parent / "fixtures" / "vqvae" / "vae-random.npz"


@pytest.fixture(scope="module")
def pali(model_dir):
    return nanopali.load(model_dir)


@pytest.fixture(scope="module")
def batch(pali, image):
    return pali.processor(images=[Image.open(image)], prompts=["caption en"])


def run(capsys, *args, stdin: bytes | None = None, monkeypatch=None):
    """nanopali.cli.main(args) -> (exit status, stdout, stderr lines)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    capsys.readouterr()
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


def assert_one_error_line(status, err, *words):
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("nanopali: error: "), err
    for word in words:
        assert word in err[0], (word, err[0])


# ---------------------------------------------------------------- CLI: generation options

OPTION_ROWS = [
    ("max-new-tokens-0", ["caption", "--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
    ("max-new-tokens-negative", ["caption", "--max-new-tokens", "-1"], ["--max-new-tokens -1", ">= 1"]),
    ("max-new-tokens-past-the-model", ["caption", "--max-new-tokens", "9000"], ["9000 new tokens", "at most 8192"]),
    ("temperature-negative", ["caption", "--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    ("temperature-nan", ["caption", "--temperature", "nan"], ["--temperature nan", "finite"]),
    ("temperature-inf", ["answer", "what?", "--temperature", "inf"], ["--temperature inf", "finite"]),
    ("top-p-2", ["caption", "--temperature", "1", "--top-p", "2"], ["--top-p 2.0", "(0, 1]"]),
    ("top-p-0", ["caption", "--temperature", "1", "--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
    ("top-p-2-without-temperature", ["caption", "--top-p", "2"], ["--top-p 2.0", "(0, 1]"]),
    ("top-k-negative", ["caption", "--temperature", "1", "--top-k", "-5"], ["--top-k -5", ">= 0"]),
    ("top-k-negative-without-temperature", ["ocr", "--top-k", "-5"], ["--top-k -5", ">= 0"]),
    ("top-p-without-temperature", ["caption", "--top-p", "0.9"], ["--top-p 0.9", "needs --temperature > 0"]),
    ("top-k-with-temperature-0", ["caption", "--temperature", "0", "--top-k", "5"], ["--top-k 5", "needs --temperature > 0"]),
    ("seed-without-temperature", ["caption", "--seed", "3"], ["--seed 3", "needs --temperature > 0"]),
    ("seed-negative", ["caption", "--temperature", "1", "--seed", "-1"], ["--seed -1", "2**64"]),
    ("seed-too-large", ["caption", "--temperature", "1", "--seed", str(2**64)], ["--seed", "2**64"]),
    ("num-beams-0", ["caption", "--num-beams", "0"], ["--num-beams 0", ">= 1"]),
    ("num-beams-negative", ["caption", "--num-beams", "-3"], ["--num-beams -3", ">= 1"]),
    ("beams-with-sampling", ["caption", "--num-beams", "2", "--temperature", "0.7"], ["--num-beams 2", "--temperature 0.7"]),
    ("beams-with-temperature-1", ["caption", "--num-beams", "2", "--temperature", "1"], ["--num-beams 2", "--temperature 1.0"]),
    ("chat-with-beams", ["chat", "--num-beams", "2"], ["--num-beams 2", "cannot stream"]),
    ("detect-max-new-tokens-0", ["detect", "cat", "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
    ("segment-num-beams-0", ["segment", "cat", "--num-beams", "0"], ["--num-beams 0"]),
    ("detect-no-labels", ["detect", " ; "], ["detect needs one or more labels"]),
]


def _with_image(args, image):
    """Insert the image after the command (every task command's first positional)."""
    return [args[0], image, *args[1:]]


@pytest.mark.parametrize("args, words", [pytest.param(a, w, id=i) for i, a, w in OPTION_ROWS])
def test_cli_refuses_bad_generation_options(capsys, model_dir, image, args, words):
    status, out, err = run(capsys, *_with_image(args, image), "--model", model_dir, "--dtype", "float32")
    assert_one_error_line(status, err, *words)
    assert out == ""


@pytest.mark.parametrize("args, words", [pytest.param(a, w, id=i) for i, a, w in OPTION_ROWS
                                         if i not in ("max-new-tokens-past-the-model",)])
def test_cli_checks_options_before_loading_the_model(capsys, image, tmp_path, args, words):
    """The option is refused even with a --model that does not exist: nothing is loaded or generated first."""
    status, _, err = run(capsys, *_with_image(args, image), "--model", tmp_path / "no-model")
    assert_one_error_line(status, err, *words)


VALID_ROWS = [
    ("max-new-tokens-1", ["caption", "--max-new-tokens", "1"]),
    ("temperature-0-explicit", ["caption", "--max-new-tokens", "2", "--temperature", "0"]),
    ("sampling-with-all-options", ["caption", "--max-new-tokens", "3", "--temperature", "0.8", "--top-p", "0.9",
                                   "--top-k", "5", "--seed", "7"]),
    ("top-p-1", ["caption", "--max-new-tokens", "2", "--temperature", "1", "--top-p", "1"]),
    ("beams", ["caption", "--max-new-tokens", "3", "--num-beams", "2"]),
    ("beams-json", ["answer", "what?", "--max-new-tokens", "3", "--num-beams", "2", "--json"]),
    ("detect-max-new-tokens-1", ["detect", "cat", "--max-new-tokens", "1", "--json"]),
    ("unicode-prompt", ["answer", "qué color? 東京", "--max-new-tokens", "2"]),
]


@pytest.mark.parametrize("args", [pytest.param(a, id=i) for i, a in VALID_ROWS])
def test_cli_valid_options_still_work(capsys, model_dir, image, args):
    status, out, err = run(capsys, *_with_image(args, image), "--model", model_dir, "--dtype", "float32")
    assert status == 0, err
    assert out.strip() or "--json" not in args
    assert not any(line.startswith("nanopali: error") for line in err)


def test_cli_max_new_tokens_is_honoured_not_replaced(capsys, model_dir, image):
    status, out, _ = run(capsys, "caption", image, "--model", model_dir, "--dtype", "float32", "--max-new-tokens", "1",
                         "--json")
    assert status == 0 and '"new_tokens": 1' in out


def test_cli_seed_makes_sampling_reproducible(capsys, model_dir, image):
    args = ["caption", image, "--model", model_dir, "--dtype", "float32", "--max-new-tokens", "6", "--temperature", "3"]
    first, again, other = (run(capsys, *args, "--seed", s)[1] for s in ("1", "1", "2"))
    assert first == again and first != other


# ---------------------------------------------------------------- CLI: prompts that are not valid text

PROMPT_ROWS = [
    ("caption-lang", ["caption", "--lang", "\udcff"], ["--lang", "byte 0xff"]),
    ("answer-question", ["answer", "what \udce9?"], ["the question", "byte 0xe9", "character 5"]),
    ("generate-prompt", ["generate", "caption \udcc3"], ["the prompt", "byte 0xc3"]),
    ("generate-lone-surrogate", ["generate", "caption \ud800"], ["the prompt", "lone surrogate"]),
    ("detect-labels", ["detect", "c\udcffat"], ["the labels", "byte 0xff"]),
    ("segment-labels", ["segment", "cat ; \udc80"], ["the labels", "byte 0x80"]),
]


@pytest.mark.parametrize("args, words", [pytest.param(a, w, id=i) for i, a, w in PROMPT_ROWS])
def test_cli_refuses_prompts_that_are_not_text(capsys, model_dir, image, args, words):
    status, _, err = run(capsys, *_with_image(args, image), "--model", model_dir, "--dtype", "float32")
    assert_one_error_line(status, err, "UTF-8", *words)
    assert "Unable to cast" not in err[0]


def test_cli_undecodable_argv_bytes_in_a_real_process(model_dir, image):
    script = shutil.which("nanopali")
    assert script, "the nanopali console script is not installed (pip install -e .)"
    out = subprocess.run([script, "answer", str(image), b"what \xff?", "--model", str(model_dir), "--dtype", "float32"],
                         capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120, check=False)
    err = out.stderr.decode("utf-8", "replace").strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and err[0].startswith("nanopali: error:"), err
    assert "byte 0xff" in err[0] and "Traceback" not in err[0]


# ---------------------------------------------------------------- CLI: chat goes on after a refused line

CHAT_ROWS = [
    ("undecodable-byte", b"\xff\xfe caption\n", "byte 0xff"),
    ("lone-surrogate-via-escape", "caption \udcc3\n".encode("utf-8", "surrogateescape"), "byte 0xc3"),
    ("over-long-line", ("x " * 9000 + "\n").encode(), "at most 8192"),
]


@pytest.mark.parametrize("bad, words", [pytest.param(b, w, id=i) for i, b, w in CHAT_ROWS])
def test_chat_refuses_a_bad_line_and_goes_on(capsys, monkeypatch, model_dir, image, bad, words):
    stdin = b"caption en\n" + bad + b"ocr\n\nnever read\n"
    status, out, err = run(capsys, "chat", image, "--model", model_dir, "--dtype", "float32", "--max-new-tokens", "2",
                           stdin=stdin, monkeypatch=monkeypatch)
    errors = [line for line in err if line.startswith("nanopali: error:")]
    assert len(errors) == 1 and errors[0].startswith("nanopali: error: line 2: ") and words in errors[0], err
    assert len(out.splitlines()) == 2, "the lines before and after the bad one were both answered"
    assert status == 2, "a refused line is reported in the exit status"
    assert len(err) == 2, err  # the banner and the one error


def test_chat_without_bad_lines_exits_0(capsys, monkeypatch, model_dir, image):
    status, out, err = run(capsys, "chat", image, "--model", model_dir, "--dtype", "float32", "--max-new-tokens", "2",
                           stdin="caption en\nanswer en qué?\n".encode(), monkeypatch=monkeypatch)
    assert status == 0 and len(out.splitlines()) == 2, err


# ---------------------------------------------------------------- CLI: --out checked before generating

def _out_rows(tmp: Path):
    (tmp / "a-folder").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("x")
    return {
        "a-directory": (tmp / "a-folder", ["is a directory"]),
        "missing-folder": (tmp / "missing" / "boxes.png", ["does not exist", "missing"]),
        "parent-is-a-file": (tmp / "a-file" / "boxes.png", ["is not a folder"]),
        "unknown-suffix": (tmp / "boxes.foo", ["'.foo'", "not an image format"]),
        "no-suffix": (tmp / "boxes", ["no suffix"]),
    }


@pytest.mark.parametrize("task", ["detect", "segment"])
@pytest.mark.parametrize("row", ["a-directory", "missing-folder", "parent-is-a-file", "unknown-suffix", "no-suffix"])
def test_out_that_cannot_be_written_is_refused_before_loading(capsys, image, tmp_path, task, row):
    out, words = _out_rows(tmp_path)[row]
    status, stdout, err = run(capsys, task, image, "cat", "--out", out, "--model", tmp_path / "no-model")
    assert_one_error_line(status, err, str(out), "--out", *words)
    assert stdout == ""


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_out_in_a_read_only_folder_is_refused(capsys, image, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        status, _, err = run(capsys, "detect", image, "cat", "--out", folder / "boxes.png", "--model", tmp_path / "none")
    finally:
        folder.chmod(0o755)
    assert_one_error_line(status, err, "not writable")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_out_on_a_full_device_is_one_line_after_the_results(capsys, model_dir, image, tmp_path):
    full = tmp_path / "full.png"
    full.symlink_to("/dev/full")
    status, out, err = run(capsys, "detect", image, "cat", "--out", full, "--json", "--model", model_dir,
                           "--dtype", "float32", "--max-new-tokens", "2")
    assert_one_error_line(status, err, str(full), "No space left")
    assert '"task": "detect"' in out, "the results were printed before the drawing failed"


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".jpg", b"\xff\xd8"), (".webp", b"RIFF")])
def test_out_is_written_in_the_format_its_suffix_names(capsys, model_dir, image, tmp_path, suffix, magic):
    out = tmp_path / f"boxes{suffix}"
    status, _, err = run(capsys, "detect", image, "cat", "--out", out, "--model", model_dir, "--dtype", "float32",
                         "--max-new-tokens", "2")
    assert status == 0, err
    assert out.read_bytes().startswith(magic) and Image.open(out).size == (60, 50)


def test_no_objects_message_is_spelled_right(capsys, model_dir, image):
    for task, word in (("detect", "(no detections;"), ("segment", "(no segmentations;")):
        status, _, err = run(capsys, task, image, "zebra", "--model", model_dir, "--dtype", "float32",
                             "--max-new-tokens", "1")
        assert status == 0 and any(line.startswith(word) for line in err), err


# ---------------------------------------------------------------- API: generation options

API_OPTION_ROWS = [
    ("max_new_tokens-0", dict(max_new_tokens=0), "max_new_tokens=0: must be an integer >= 1"),
    ("max_new_tokens-negative", dict(max_new_tokens=-4), "max_new_tokens=-4"),
    ("max_new_tokens-float", dict(max_new_tokens=2.5), "max_new_tokens=2.5: must be an integer"),
    ("max_new_tokens-None", dict(max_new_tokens=None), "max_new_tokens=None"),
    ("min-more-than-max", dict(min_new_tokens=10, max_new_tokens=5), r"min_new_tokens=10: .*max_new_tokens \(5\)"),
    ("min_new_tokens-negative", dict(min_new_tokens=-1), "min_new_tokens=-1"),
    ("temperature-negative", dict(do_sample=True, temperature=-1.0), "temperature=-1.0: must be a finite number >= 0"),
    ("temperature-nan", dict(do_sample=True, temperature=math.nan), "temperature=nan"),
    ("temperature-negative-greedy", dict(temperature=-1.0), "temperature=-1.0"),
    ("top_p-2", dict(do_sample=True, top_p=2.0), r"top_p=2.0: must be in \(0, 1\]"),
    ("top_p-0", dict(do_sample=True, top_p=0.0), "top_p=0.0"),
    ("top_p-2-greedy", dict(top_p=2.0), "top_p=2.0"),
    ("top_k-negative", dict(do_sample=True, top_k=-5), "top_k=-5: must be an integer >= 0"),
    ("num_beams-0", dict(num_beams=0), "num_beams=0: must be an integer >= 1"),
    ("num_beams-negative", dict(num_beams=-3), "num_beams=-3"),
    ("length_penalty-nan", dict(num_beams=2, length_penalty=math.nan), "length_penalty=nan: must be a finite number"),
    ("repetition_penalty-0", dict(repetition_penalty=0), "repetition_penalty=0: must be a finite number > 0"),
    ("repetition_penalty-negative", dict(repetition_penalty=-1), "repetition_penalty=-1"),
    ("repetition_penalty-inf", dict(repetition_penalty=math.inf), "repetition_penalty=inf"),
    ("eos-outside-vocabulary", dict(eos_token_id=10**6), r"eos_token_id 1000000 is outside the model's vocabulary"),
    ("eos-negative-in-a-list", dict(eos_token_id=[1, -2]), "eos_token_id -2 is outside"),
    ("eos-not-an-int", dict(eos_token_id="1"), "eos_token_id='1': must be an int"),
    ("pad-outside-vocabulary", dict(pad_token_id=10**6), "pad_token_id 1000000 is outside"),
    ("vocab_limit-0", dict(vocab_limit=0), "vocab_limit=0: must be an integer >= 1"),
    ("vocab_limit-past-the-rows", dict(vocab_limit=10**6), "vocab_limit=1000000: must be between 1 and the model's"),
    ("generator-not-a-generator", dict(do_sample=True, generator=3), "generator must be a torch.Generator or None, got int"),
    ("stop_strings-empty-string", dict(stop_strings=[""]), "stop_strings=.*non-empty strings"),
    ("beams-with-sampling", dict(num_beams=2, do_sample=True), r"num_beams=2 \(beam search\) cannot be combined with do_sample"),
    ("beams-with-top_k", dict(num_beams=2, top_k=5), "cannot be combined with top_k=5"),
    ("beams-with-stop-strings", dict(num_beams=2, stop_strings=["a"]), "cannot be combined with stop_strings"),
]


@pytest.mark.parametrize("options, message", [pytest.param(o, m, id=i) for i, o, m in API_OPTION_ROWS])
@pytest.mark.parametrize("entry", ["pipeline", "generate", "generate_tokens"])
def test_api_refuses_bad_generation_options(pali, image, batch, entry, options, message):
    call = {"pipeline": lambda: pali.caption(Image.open(image), **options),
            "generate": lambda: generate(pali.model, **batch, **options),
            "generate_tokens": lambda: generate_tokens(pali.model, **batch, **options)}[entry]
    with pytest.raises(UsageError, match=message):
        call()  # generate_tokens raises when called, before it is iterated


def test_streaming_refuses_options_when_called(pali, image):
    with pytest.raises(UsageError, match="max_new_tokens=0"):
        pali.stream(image, "caption en", max_new_tokens=0)  # not only once iterated
    with pytest.raises(UsageError, match="beam search cannot stream"):
        generate_tokens(pali.model, **pali.processor(images=[Image.open(image)], prompts=["x"]), num_beams=2)


def test_unknown_option_is_a_type_error_naming_it(pali, batch):
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['top_n'\\]"):
        generate(pali.model, **batch, top_n=3)


def test_options_are_one_object_the_cli_spells_as_flags():
    from nanopali.cli.common import cli_spelling

    with pytest.raises(UsageError, match="^--top-p 2.0: must be in"):
        GenerationOptions(top_p=2.0, spell=cli_spelling)
    options = GenerationOptions(eos_token_id=np.int64(5), max_new_tokens=np.int32(3), temperature=1)
    assert options.eos_token_id == (5,) and options.max_new_tokens == 3 and type(options.max_new_tokens) is int
    assert options.kwargs() == {"max_new_tokens": 3, "eos_token_id": [5]}
    assert GenerationOptions(stop_strings="</s>").stop_strings == ("</s>",)


VALID_API_ROWS = [
    ("max_new_tokens-1", dict(max_new_tokens=1)),
    ("greedy-ignores-top_p-and-top_k", dict(max_new_tokens=3, top_p=0.5, top_k=2)),
    ("temperature-0-sampling-is-greedy", dict(max_new_tokens=3, do_sample=True, temperature=0.0)),
    ("min-equals-max", dict(max_new_tokens=3, min_new_tokens=3)),
    ("no-eos-at-all", dict(max_new_tokens=3, eos_token_id=[])),
    ("eos-as-a-tensor", dict(max_new_tokens=3, eos_token_id=torch.tensor([1, 2]))),
    ("vocab_limit-every-row", dict(max_new_tokens=3, vocab_limit="rows")),
    ("beams-with-defaults-spelled-out", dict(max_new_tokens=3, num_beams=2, top_p=1.0, top_k=0, temperature=1.0)),
    ("repetition-penalty-above-1", dict(max_new_tokens=3, repetition_penalty=1.3)),
    ("stop-string-as-a-str", dict(max_new_tokens=3, stop_strings="<loc")),
]


@pytest.mark.parametrize("options", [pytest.param(o, id=i) for i, o in VALID_API_ROWS])
def test_api_valid_options_still_work(pali, image, options):
    if options.get("vocab_limit") == "rows":
        options = {**options, "vocab_limit": pali.model.config.text_config.vocab_size}
    assert isinstance(pali.caption(Image.open(image), **options), str)


def test_greedy_with_top_p_is_greedy(pali, batch):
    plain = generate(pali.model, **batch, max_new_tokens=5)
    assert torch.equal(generate(pali.model, **batch, max_new_tokens=5, top_p=0.5, top_k=3), plain)


# ---------------------------------------------------------------- API: model inputs

def _with_id(batch, row, position, value):
    ids = batch["input_ids"].clone()
    ids[row, position] = value
    return {**batch, "input_ids": ids}


def _with_pixels(batch, value):
    pixels = batch["pixel_values"].clone()
    pixels[0, 1, 2, 3] = value
    return {**batch, "pixel_values": pixels}


INPUT_ROWS = [
    ("id-negative", lambda b, V: _with_id(b, 0, -3, -1), r"token id -1 at row 0, position \d+ of input_ids is outside"),
    ("id-equal-to-vocab", lambda b, V: _with_id(b, 0, -2, V), r"token id {V} at row 0, position \d+"),
    ("id-far-past-vocab", lambda b, V: _with_id(b, 0, -1, 10**9), "token id 1000000000"),
    ("ids-float", lambda b, V: {**b, "input_ids": b["input_ids"].float()}, "input_ids must be an integer tensor"),
    ("pixels-nan", lambda b, V: _with_pixels(b, math.nan), "pixel_values of image 0 contain NaN or infinite values"),
    ("pixels-inf", lambda b, V: _with_pixels(b, math.inf), "NaN or infinite"),
    ("pixels-missing", lambda b, V: {k: v for k, v in b.items() if k != "pixel_values"}, "no pixel_values were given"),
    ("attention-all-zero", lambda b, V: {**b, "attention_mask": torch.zeros_like(b["attention_mask"])}, "all zeros"),
]


@pytest.mark.parametrize("entry, make, message", [
    pytest.param(entry, f, m, id=f"{i}-{entry}") for i, f, m in INPUT_ROWS
    for entry in ("forward", "generate", "beams", "generate_tokens")
    if not (entry == "forward" and i == "attention-all-zero")])  # forward takes an all-padding row (logits unused)
def test_api_refuses_bad_model_inputs(pali, batch, entry, make, message):
    V = pali.model.config.text_config.vocab_size
    inputs = make(batch, V)
    call = {"forward": lambda: pali.model(**inputs),
            "generate": lambda: generate(pali.model, **inputs, max_new_tokens=2),
            "beams": lambda: generate(pali.model, **inputs, max_new_tokens=2, num_beams=2),
            "generate_tokens": lambda: next(iter(generate_tokens(pali.model, **inputs, max_new_tokens=2)))}[entry]
    with pytest.raises(UsageError, match=message.replace("{V}", str(V))):
        call()


def test_a_valid_batch_with_the_highest_id_is_accepted(pali, batch):
    V = pali.model.config.text_config.vocab_size
    out = pali.model(**_with_id(batch, 0, -2, V - 1))
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------- API: prompts, labels, images

API_CALL_ROWS = [
    ("detect-labels-int", lambda p, im: p.detect(im, 5), UsageError, "labels must be a string or a list of strings, got int"),
    ("segment-labels-None", lambda p, im: p.segment(im, None), UsageError, "got NoneType"),
    ("detect-labels-list-with-int", lambda p, im: p.detect(im, ["cat", 1]), UsageError, "got list of int, str"),
    ("detect-labels-empty", lambda p, im: p.detect(im, []), UsageError, "one or more non-empty labels"),
    ("answer-question-None", lambda p, im: p.answer(im, None), UsageError, "question must be a string, got NoneType"),
    ("caption-lang-int", lambda p, im: p.caption(im, lang=3), UsageError, "lang must be a string"),
    ("generate-prompts-int", lambda p, im: p.generate(im, 7), UsageError, "prompts must be a string or a list"),
    ("generate-prompt-count", lambda p, im: p.generate([im, im], ["a", "b", "c"]), UsageError, "3 prompts for 2 images"),
    ("caption-no-images", lambda p, im: p.caption([]), UsageError, "no images were given"),
    ("stream-prompt-bytes", lambda p, im: p.stream(im, b"caption en"), UsageError, "prompt must be a string, got bytes"),
    ("generate-undecodable-byte", lambda p, im: p.generate(im, "caption \udcff"), UsageError, "byte 0xff.*UTF-8"),
    ("answer-lone-surrogate", lambda p, im: p.answer(im, "what\ud800"), UsageError, "lone surrogate"),
    ("stream-undecodable-byte", lambda p, im: p.stream(im, "caption \udce9"), UsageError, "byte 0xe9"),
    ("detect-label-undecodable", lambda p, im: p.detect(im, "c\udcffat"), UsageError, "byte 0xff"),
    ("tokenizer-encode", lambda p, im: p.processor.tokenizer.encode("a\udcffb"), UsageError, "character 1"),
    ("processor-second-prompt", lambda p, im: p.processor(images=[im, im], prompts=["ok", "bad \udcff"]), UsageError,
     "prompt 1 contains the undecodable byte 0xff"),
]


@pytest.mark.parametrize("call, error, message", [pytest.param(c, e, m, id=i) for i, c, e, m in API_CALL_ROWS])
def test_api_refuses_bad_prompts_and_labels(pali, image, call, error, message):
    with pytest.raises(error, match=message) as caught:
        call(pali, Image.open(image))
    assert isinstance(caught.value, NanopaliError)


def test_draw_checks_its_path_helper(tmp_path):
    from nanopali.tasks.drawing import check_output

    assert check_output(tmp_path / "x.PNG") == (tmp_path / "x.PNG", "PNG")
    assert check_output(tmp_path / "x.jpeg")[1] == "JPEG"
    with pytest.raises(MissingFileError, match="does not exist"):
        check_output(tmp_path / "nope" / "x.png")
