"""Training never loses or mislabels work, and every bad training input is one clear error (issue 20).

Tables, one row per case: bad options (API and CLI), bad run directories and config files, bad data lines
(refused naming file:line, or skipped and counted with --skip-bad), resumes with changed options. Then the
sequences: two runs into one --out, --overwrite, --keep-checkpoints 1 across runs and resumes, SIGTERM and
SIGINT mid-run through the CLI, a `kill -9` after a checkpoint (metrics.jsonl keeps one line per step).
Runs are a few steps of the tiny model of test_train.py.
"""

import io
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import InterruptAt, base, data, weights  # noqa: F401  (base, data are fixtures)

from nanopali import Processor, cli
from nanopali.errors import DataError, MissingFileError, NanopaliError, UsageError
from nanopali.train import JsonlDataset, TrainConfig, TrainingInterrupted, fit, loop
from nanopali.train import checkpoint as ckpt

OPTIONS = dict(steps=4, batch_size=2, lr=3e-3, warmup_steps=2, seed=1)


def config(base, data_file, out, **kw) -> TrainConfig:
    """The tiny 4-step run of these tests (data_file None: pass train_data to fit); kw change options."""
    data = None if data_file is None else str(data_file)
    return TrainConfig(**{**dict(model=str(base), data=data, out=str(out), **OPTIONS), **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def loss_steps(out: Path) -> list[int]:
    return [r["step"] for r in metrics(out) if "loss" in r]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(capsys, *args) -> tuple[int, str, str]:
    """`nanopali ARGS` in this process: (exit status, stdout, stderr of this call only)."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, alone: bool = True) -> str:
    """The one `nanopali: error:` line of stderr, its last line (with `alone`, its only line: nothing ran)."""
    lines = [line for line in err.splitlines() if line.strip()]  # tqdm's \r updates split too
    errors = [line for line in lines if line.startswith("nanopali: error:")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    assert not alone or len(lines) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def finished(base, data, tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4 (and its weights at 4)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(config(base, data, out, save_every=2, keep_checkpoints=5))
    return out


def stopped_at_2(finished: Path, out: Path) -> Path:
    """A copy of the finished run as if it had stopped after checkpoint 2 (and its metrics up to there)."""
    out.mkdir(parents=True)
    shutil.copytree(finished / "checkpoint-000002", out / "checkpoint-000002")
    (out / ckpt.LATEST).write_text("checkpoint-000002\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(finished) if r["step"] <= 2))
    return out


# ------------------------------------------------------------------------------------------ option values

@pytest.mark.parametrize("changes, message", [
    pytest.param(dict(steps=-5), r"steps \(--steps\) must be at least 1, got -5", id="steps-negative"),
    pytest.param(dict(steps=0), r"steps \(--steps\) must be at least 1", id="steps-zero"),
    pytest.param(dict(batch_size=0), r"batch_size \(--batch-size\) must be at least 1", id="batch-size-zero"),
    pytest.param(dict(grad_accum=0), r"grad_accum \(--grad-accum\) must be at least 1, got 0", id="grad-accum-zero"),
    pytest.param(dict(lr=0), r"lr \(--lr\) must be a finite number > 0", id="lr-zero"),
    pytest.param(dict(lr=-1e-3), r"lr \(--lr\) must be a finite number > 0", id="lr-negative"),
    pytest.param(dict(lr=math.nan), r"lr \(--lr\) must be a finite number > 0, got nan", id="lr-nan"),
    pytest.param(dict(lr=math.inf), r"lr \(--lr\) must be a finite number > 0", id="lr-inf"),
    pytest.param(dict(lr_scale={"multi_modal_projector.*": 0}), r"lr_scale .* must be finite numbers > 0",
                 id="lr-scale-zero"),
    pytest.param(dict(weight_decay=-0.1), r"weight_decay .* must be a finite number >= 0", id="weight-decay-negative"),
    pytest.param(dict(warmup_steps=-3), r"warmup_steps .* must be between 0 and steps \(4\), got -3", id="warmup-negative"),
    pytest.param(dict(warmup_steps=10), r"warmup_steps .* must be between 0 and steps \(4\), got 10", id="warmup-past-end"),
    pytest.param(dict(min_lr_ratio=1.5), r"min_lr_ratio .* must be between 0 and 1", id="min-lr-ratio-above-1"),
    pytest.param(dict(max_grad_norm=-1.0), r"max_grad_norm .* must be a number >= 0", id="max-grad-norm-negative"),
    pytest.param(dict(max_grad_norm=math.nan), r"max_grad_norm .* must be a number >= 0", id="max-grad-norm-nan"),
    pytest.param(dict(loss_reduction="mean"), r"loss_reduction .* must be one of token, example", id="loss-reduction"),
    pytest.param(dict(label_smoothing=5.0), r"label_smoothing .* must be at least 0 and below 1, got 5.0",
                 id="label-smoothing-5"),
    pytest.param(dict(label_smoothing=1.0), r"label_smoothing .* below 1", id="label-smoothing-1"),
    pytest.param(dict(max_length=0), r"max_length \(--max-length\) must be at least 1", id="max-length-zero"),
    pytest.param(dict(save_every=-1), r"save_every \(--save-every\) must be at least 0", id="save-every-negative"),
    pytest.param(dict(keep_checkpoints=0), r"keep_checkpoints .* must be at least 1", id="keep-checkpoints-zero"),
    pytest.param(dict(eval_every=-2), r"eval_every .* must be at least 0", id="eval-every-negative"),
    pytest.param(dict(eval_max_new_tokens=0), r"eval_max_new_tokens .* must be at least 1", id="eval-tokens-zero"),
    pytest.param(dict(log_every=0), r"log_every \(--log-every\) must be at least 1, got 0", id="log-every-zero"),
    pytest.param(dict(recipe="vision-only"), r"recipe .* must be one of full, freeze-vision", id="recipe-unknown"),
    pytest.param(dict(lora_rank=-1), r"lora_rank .* must be at least 0", id="lora-rank-negative"),
    pytest.param(dict(lora_alpha=0.0), r"lora_alpha .* must be a finite number > 0", id="lora-alpha-zero"),
    pytest.param(dict(lora_dropout=1.0), r"lora_dropout .* below 1", id="lora-dropout-1"),
    pytest.param(dict(lora_targets=["qkv"]), r"lora_targets .* must be one or more of q_proj", id="lora-target-unknown"),
    pytest.param(dict(lora_targets=[]), r"lora_targets .* must be one or more of", id="lora-targets-empty"),
    pytest.param(dict(steps="5"), r"steps \(--steps\) must be an integer, got '5'", id="type-steps-string"),
    pytest.param(dict(steps=2.5), r"steps \(--steps\) must be an integer, got 2.5", id="type-steps-float"),
    pytest.param(dict(steps=True), r"steps \(--steps\) must be an integer, got True", id="type-steps-bool"),
    pytest.param(dict(lr="1e-4"), r"lr \(--lr\) must be a number, got '1e-4'", id="type-lr-string"),
    pytest.param(dict(bf16="yes"), r"bf16 \(--bf16\) must be true or false", id="type-bf16-string"),
    pytest.param(dict(max_length="64"), r"max_length .* must be an integer or null", id="type-max-length-string"),
    pytest.param(dict(lr_scale={"x": "big"}), r"lr_scale .* must be an object of name pattern: number", id="type-lr-scale"),
    pytest.param(dict(lora_targets="q_proj"), r"lora_targets .* must be a list of names", id="type-lora-targets-string"),
    pytest.param(dict(out=""), r"out \(--out\) must be a non-empty string", id="type-out-empty"),
    pytest.param(dict(data=5), r"data \(--data\) must be a non-empty string or null", id="type-data-number"),
    pytest.param(dict(resume=True, overwrite=True), r"--resume and --overwrite contradict each other",
                 id="resume-and-overwrite"),
])
def test_bad_option_values_are_usage_errors_naming_the_option(changes, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(**{**dict(model="m", data="d.jsonl", out="runs/x", **OPTIONS), **changes})


def test_values_are_normalised_and_edge_values_accepted():
    c = TrainConfig(model="m", lr=1, lora_targets=["q_proj", "v_proj"], lr_scale={"x.*": 2}, max_grad_norm=0,
                    warmup_steps=100, steps=100, min_lr_ratio=1.0)
    assert c.lr == 1.0 and isinstance(c.lr, float) and c.lora_targets == ("q_proj", "v_proj")
    assert c.lr_scale == {"x.*": 2.0} and c.max_grad_norm == 0.0
    assert TrainConfig(model="m", max_grad_norm=None, max_length=None).max_grad_norm is None


def test_log_every_larger_than_one_logs_every_nth_step_and_the_last(base, data, tmp_path):
    fit(config(base, data, tmp_path / "r", steps=5, log_every=2))
    assert loss_steps(tmp_path / "r") == [2, 4, 5]


# --------------------------------------------------------------------- the command line: one line, status 2

@pytest.fixture()
def files(base, data, finished, tmp_path):
    """The paths the CLI rows below name."""
    images = data.parent
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a-file").write_text("x")
    (bad / "train.json").write_text('{"steps": 2,\n "lr": 1e-3,,}\n')
    (bad / "list.json").write_text("[1, 2]")
    (bad / "binary.jsonl").write_bytes((images / "0.png").read_bytes())
    good = json.dumps({"image": str(images / "0.png"), "prefix": "caption en", "suffix": "red circle"})
    (bad / "latin1.jsonl").write_bytes(good.encode() + b'\n{"image": "0.png", "prefix": "caption en", '
                                       b'"suffix": "caf\xe9"}\n')
    (bad / "suffix-image.jsonl").write_text(json.dumps({"image": str(images / "0.png"), "prefix": "caption en",
                                                        "suffix": "a <image> here"}) + "\n")
    truncated = bad / "cut.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (bad / "truncated.jsonl").write_text(good + "\n" + json.dumps({"image": str(truncated), "prefix": "caption en",
                                                                   "suffix": "x"}) + "\n")
    (bad / "long.jsonl").write_text(json.dumps({"image": str(images / "0.png"), "prefix": "caption en",
                                                "suffix": "a very long suffix " * 8}) + "\n")
    return dict(base=base, data=data, finished=finished, file=bad / "a-file", under_file=bad / "a-file" / "run",
                bad_json=bad / "train.json", list_json=bad / "list.json", missing_json=bad / "nope.json",
                binary=bad / "binary.jsonl", latin1=bad / "latin1.jsonl", suffix_image=bad / "suffix-image.jsonl",
                truncated=bad / "truncated.jsonl", long=bad / "long.jsonl", folder=bad, out=tmp_path / "new-run")


TRAIN = ["train", "--model", "{base}", "--data", "{data}", "--out", "{out}", "--steps", "2", "--batch-size", "2"]


@pytest.mark.parametrize("args, message", [
    pytest.param(["--grad-accum", "0"], r"grad_accum \(--grad-accum\) must be at least 1, got 0", id="grad-accum-0"),
    pytest.param(["--steps", "-5"], r"steps \(--steps\) must be at least 1, got -5", id="steps-negative"),
    pytest.param(["--warmup-steps", "-3"], r"warmup_steps \(--warmup-steps\) must be between 0", id="warmup-negative"),
    pytest.param(["--save-every", "-1"], r"save_every \(--save-every\) must be at least 0", id="save-every-negative"),
    pytest.param(["--log-every", "0"], r"log_every \(--log-every\) must be at least 1", id="log-every-0"),
    pytest.param(["--label-smoothing", "5"], r"label_smoothing \(--label-smoothing\) must be at least 0 and below 1",
                 id="label-smoothing-5"),
    pytest.param(["--resume", "--overwrite"], r"--resume and --overwrite contradict", id="resume-and-overwrite"),
    pytest.param(["--lr-scale", '{"multi_modal_projecter.*": 10}'], r"lr_scale patterns \['multi_modal_projecter\.\*'\] "
                 r"match no parameter", id="lr-scale-typo"),
    pytest.param(["--out", "{file}"], r"--out .*a-file is a file, not a run directory", id="out-is-a-file"),
    pytest.param(["--out", "{under_file}"], r"cannot create the run directory .*a-file/run \(Not a directory\)",
                 id="out-under-a-file"),
    pytest.param(["--out", "{finished}"], r"run already holds a training run \(checkpoint-000002, checkpoint-000004, "
                 r"latest, metrics.jsonl, loss.png\); pass --resume to continue it or --overwrite", id="out-holds-a-run"),
    pytest.param(["--config", "{bad_json}"], r"training config .*train.json: not valid JSON \(Expecting property name "
                 r"enclosed in double quotes at line 2 column 13\)", id="config-bad-json"),
    pytest.param(["--config", "{list_json}"], r"list.json: expected a JSON object of options, got list", id="config-list"),
    pytest.param(["--config", "{missing_json}"], r"training config .*nope.json does not exist", id="config-missing"),
    pytest.param(["--config", "{folder}"], r"training config .*bad is a directory", id="config-directory"),
    pytest.param(["--data", "{binary}"], r"binary.jsonl is a binary file, not JSONL text", id="data-binary"),
    pytest.param(["--data", "{latin1}"], r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 58\)", id="data-latin1"),
    pytest.param(["--data", "{folder}"], r"training data .*bad is a directory, not a JSONL file", id="data-directory"),
    pytest.param(["--data", "{suffix_image}"], r"suffix-image.jsonl:1: the suffix contains <image>", id="data-suffix-image"),
    pytest.param(["--data", "{truncated}"], r"truncated.jsonl:2: image .*cut.jpg cannot be read \(the image could not "
                 r"be decoded; the file is truncated", id="data-truncated-jpeg"),
    pytest.param(["--data", "{long}", "--max-length", "30"], r"long.jsonl:1: takes \d+ tokens \(16 image tokens.*more "
                 r"than max_length=30; raise --max-length", id="data-longer-than-max-length"),
])
def test_cli_refuses_bad_training_inputs_in_one_line(capsys, files, args, message):
    code, out, err = main(capsys, *[a if a.startswith('{"') else a.format(**files) for a in TRAIN + args])
    assert code == 2 and out == ""
    assert re.search(message, error_line(err)), err
    assert not (files["out"] / "metrics.jsonl").exists() and not ckpt.checkpoints(files["out"])


def unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root writes anywhere but into sysfs)."""
    folder = Path("/sys") if os.geteuid() == 0 else tmp_path / "read-only"
    if folder != Path("/sys"):
        folder.mkdir()
        folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return folder
    pytest.skip(f"{folder} is writable here")


def test_cli_refuses_an_out_it_cannot_write_before_training(capsys, base, data, tmp_path, monkeypatch):
    folder = unwritable(tmp_path)
    loaded = []
    monkeypatch.setattr(loop, "start_run", lambda *a, **kw: loaded.append(a))
    code, _, err = main(capsys, *[a.format(base=base, data=data, out=folder) for a in TRAIN])
    assert code == 2 and "cannot write into the run directory" in error_line(err) and "choose another --out" in err
    assert not loaded, "refused before the model was loaded"


# ------------------------------------------------------------------------------------------- bad data lines

def jsonl(folder: Path, records: list) -> Path:
    path = folder / "d.jsonl"
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records))
    return path


@pytest.fixture()
def bad_lines(data, tmp_path):
    """A JSONL file: two good lines, then one bad line per row of BAD_LINES."""
    images = data.parent
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    (tmp_path / "text.png").write_text("not an image")
    good = [{"image": str(images / f"{i}.png"), "prefix": "caption en", "suffix": s}
            for i, s in enumerate(["red circle", "blue square"])]
    return good, tmp_path


def line(image="{images}/0.png", prefix="caption en", suffix="red circle") -> dict:
    return {"image": image, "prefix": prefix, "suffix": suffix}


BAD_LINES = [  # (id, the line, reason it is counted under, message)
    ("truncated-jpeg", line(image="cut.jpg"), "image cannot be read",
     r"image .*cut.jpg cannot be read \(the image could not be decoded; the file is truncated"),
    ("text-as-png", line(image="text.png"), "image cannot be read", r"image .*text.png cannot be read \(not an image file"),
    ("missing-image", line(image="nope.png"), "image does not exist", r"image .*nope.png does not exist"),
    ("suffix-image-token", line(suffix="a <image> b"), "<image> in suffix", r"the suffix contains <image>"),
    ("prefix-image-token", line(prefix="<image>caption en"), "<image> in prefix", r"the prefix contains <image>"),
    ("lone-surrogate", b'{"image": "{images}/0.png", "prefix": "caption en", "suffix": "\\ud800"}',
     "invalid text in suffix", r"the suffix holds a lone surrogate '\\ud800' at character 0"),
    ("too-long", line(suffix="many words " * 20), "longer than max_length", r"takes \d+ tokens .*more than max_length=40"),
    ("not-utf8", b'{"image": "{images}/0.png", "prefix": "caption en", "suffix": "caf\xe9"}', "not UTF-8",
     r"not UTF-8 text \(byte 0xe9"),
    ("not-json", b"{'image': 1}", "not valid JSON", r"not valid JSON \(Expecting property name"),
    ("not-an-object", [1, 2], "not a JSON object", r"expected a JSON object .* got list"),
    ("missing-suffix", {"image": "{images}/0.png", "prefix": "caption en"}, "missing fields",
     r"missing or non-string field\(s\) \['suffix'\]"),
]


def encoded(row, data) -> bytes:
    """A BAD_LINES row as the bytes of its line, {images} replaced by the folder of the test images."""
    row = row if isinstance(row, bytes) else json.dumps(row).encode()
    return row.replace(b"{images}", str(data.parent).encode())


def bad_file(bad_lines, data, row) -> Path:
    good, folder = bad_lines
    return jsonl(folder, [*good, encoded(row, data)])


@pytest.mark.parametrize("row, reason, message", [pytest.param(*r[1:], id=r[0]) for r in BAD_LINES])
def test_a_bad_line_is_an_error_naming_file_line_and_reason(base, data, bad_lines, row, reason, message):
    path = bad_file(bad_lines, data, row)
    processor = Processor.from_pretrained(base)
    with pytest.raises(DataError, match=r"d.jsonl:3: " + message):
        JsonlDataset(path, processor=processor, max_length=40)
    skipping = JsonlDataset(path, skip_bad=True, processor=processor, max_length=40)
    assert len(skipping) == 2 and dict(skipping.skipped_reasons) == {reason: 1}
    assert skipping.skipped[0].startswith(f"{path}:3: ")


def test_skip_bad_trains_past_late_failures_and_reports_them(base, data, bad_lines, tmp_path, capsys):
    good, folder = bad_lines
    rows = [encoded(r[1], data) for r in BAD_LINES if r[0] in ("truncated-jpeg", "suffix-image-token", "lone-surrogate")]
    path = jsonl(folder, [*good, *rows, *good])
    # without --skip-bad: the first bad line stops the run before any training
    with pytest.raises(DataError, match=r"d.jsonl:3: image .*cut.jpg cannot be read"):
        fit(config(base, path, tmp_path / "strict", steps=2))
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()
    # with it: the bad lines are skipped and counted, and every batch of 4 steps draws only good ones
    capsys.readouterr()
    final = fit(config(base, path, tmp_path / "r", steps=4, skip_bad=True))
    assert final.name == "checkpoint-000004"
    first = metrics(tmp_path / "r")[0]
    assert first["step"] == 0 and first["skipped_examples"] == 3
    assert first["skipped_reasons"] == {"image cannot be read": 1, "<image> in suffix": 1, "invalid text in suffix": 1}
    assert [s.split(": ")[0].rsplit(":")[-1] for s in first["skipped_lines"]] == ["3", "4", "5"]
    assert loss_steps(tmp_path / "r") == [1, 2, 3, 4]
    assert "d.jsonl: 3 bad lines skipped: 1 image cannot be read, 1 <image> in suffix, 1 invalid text in suffix" \
        in capsys.readouterr().err


def test_an_iterable_that_runs_out_is_a_data_error(base, data, tmp_path):
    examples = list(JsonlDataset(data))
    with pytest.raises(DataError, match=r"ran out at step 2 of 4: it needs 8 examples"):
        fit(config(base, None, tmp_path / "r"), train_data=iter(examples[:3]))


# ---------------------------------------------------------------------------- one run directory, many runs

def test_training_again_into_a_run_is_refused_and_overwrite_starts_a_clean_run(base, data, tmp_path, capsys):
    out = tmp_path / "run"
    first = fit(config(base, data, out, steps=4, save_every=2))
    first_weights = weights(first)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"already holds a training run .*pass --resume to continue it or --overwrite"):
        fit(config(base, data, out, steps=3, lr=1e-2))
    assert same_weights(weights(ckpt.latest(out)), first_weights) and loss_steps(out) == [1, 2, 3, 4]
    code, _, err = main(capsys, "train", "--model", base, "--data", data, "--out", out, "--steps", "3")
    assert code == 2 and "already holds a training run" in error_line(err)
    second = fit(config(base, data, out, steps=3, lr=1e-2, overwrite=True))
    assert second.name == "checkpoint-000003" and ckpt.latest(out) == second
    assert not same_weights(weights(second), first_weights)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000003", "latest", "loss.png", "metrics.jsonl", "notes.txt"]
    assert loss_steps(out) == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"  # overwrite deletes only what nanopali wrote


def test_keep_one_checkpoint_across_runs_and_resumes_latest_is_always_complete(base, data, finished, tmp_path):
    out = tmp_path / "run"

    def check() -> Path:
        last = ckpt.latest(out)
        assert last is not None and (last / ckpt.STATE_FILE).is_file() and (last / "config.json").is_file()
        assert [p for _, p in ckpt.checkpoints(out)] == [last], "keep_checkpoints=1 keeps only latest"
        return last

    examples = list(JsonlDataset(data))
    options = dict(save_every=1, keep_checkpoints=1)
    with pytest.raises(TrainingInterrupted):  # SIGTERM while collecting step 1; saved every step
        fit(config(base, None, out, **options), train_data=InterruptAt(examples, 1))
    assert check().name == "checkpoint-000001"
    with pytest.raises(TrainingInterrupted):  # resumed, stopped again at step 2
        fit(config(base, None, out, **options, resume=True), train_data=InterruptAt(examples, 1))
    assert check().name == "checkpoint-000002"
    # a continuation abandoned after its checkpoint 4 was renamed into place but before `latest` moved to it
    shutil.copytree(finished / "checkpoint-000004", out / "checkpoint-000004")
    (out / "checkpoint-000004" / "abandoned").write_text("")
    assert ckpt.latest(out).name == "checkpoint-000002"
    final = fit(config(base, None, out, keep_checkpoints=1, resume=True), train_data=examples)
    assert check() == final and final.name == "checkpoint-000004" and not (final / "abandoned").exists()
    assert same_weights(weights(final), weights(finished / "checkpoint-000004"))
    assert loss_steps(out) == [1, 2, 3, 4]
    # resuming the finished run trains nothing and names the same complete checkpoint
    assert fit(config(base, None, out, keep_checkpoints=1, resume=True), train_data=examples) == final
    assert check() == final and loss_steps(out) == [1, 2, 3, 4]


def test_resume_into_a_new_directory_starts_the_run(base, data, finished, tmp_path):
    final = fit(config(base, data, tmp_path / "new", save_every=2, resume=True))
    assert same_weights(weights(final), weights(finished / "checkpoint-000004"))


def test_resume_without_a_latest_file_continues_from_the_newest_complete_checkpoint(base, data, finished, tmp_path):
    out = stopped_at_2(finished, tmp_path / "run")
    (out / ckpt.LATEST).unlink()  # killed between renaming its first checkpoint into place and writing `latest`
    (out / "checkpoint-000003").mkdir()  # an incomplete folder is never a resume point
    final = fit(config(base, data, out, resume=True))
    assert same_weights(weights(final), weights(finished / "checkpoint-000004"))


def test_latest_naming_a_deleted_checkpoint_is_a_clear_error(finished, tmp_path):
    out = stopped_at_2(finished, tmp_path / "run")
    (out / ckpt.LATEST).write_text("checkpoint-000009\n")
    with pytest.raises(MissingFileError, match=r"latest names 'checkpoint-000009', which is not a complete checkpoint"):
        ckpt.latest(out)


def test_save_replaces_an_existing_checkpoint_folder_and_never_prunes_latest(tmp_path):
    def writer(tag):
        def write(path):
            path.mkdir()
            (path / "tag").write_text(tag)
        return write
    ckpt.save(tmp_path, 1, writer("old run"), {"step": 1}, keep=1)
    ckpt.save(tmp_path, 1, writer("this run"), {"step": 1}, keep=1)  # was: returned early, keeping the old weights
    assert (tmp_path / "checkpoint-000001" / "tag").read_text() == "this run"
    for step in (5, 3):  # a later folder left by an abandoned continuation, then this run's step 3
        ckpt.save(tmp_path, step, writer(str(step)), {"step": step}, keep=1)
    assert ckpt.latest(tmp_path).name == "checkpoint-000003"
    assert [p.name for _, p in ckpt.checkpoints(tmp_path)] == ["checkpoint-000003"]
    ckpt.save(tmp_path, 1_000_000, writer("big"), {"step": 1_000_000}, keep=2)  # 7 digits sort by step, not name
    assert [s for s, _ in ckpt.checkpoints(tmp_path)] == [3, 1_000_000] and ckpt.latest(tmp_path).name.endswith("1000000")
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".latest*"))


# ------------------------------------------------------------------------------- resume with other options

@pytest.mark.parametrize("changes, message", [
    pytest.param(dict(lr=1e-2), r"\(lr=0.003 -> 0.01\)", id="lr"),
    pytest.param(dict(steps=8), r"\(steps=4 -> 8\).*the schedule is defined by the steps a run started with",
                 id="steps"),
    pytest.param(dict(batch_size=4), r"batch_size=2 -> 4", id="batch-size"),
    pytest.param(dict(grad_accum=2), r"grad_accum=1 -> 2", id="grad-accum"),
    pytest.param(dict(warmup_steps=1), r"warmup_steps=2 -> 1", id="warmup-steps"),
    pytest.param(dict(min_lr_ratio=0.1, weight_decay=0.1), r"weight_decay=0.0 -> 0.1; min_lr_ratio=0.0 -> 0.1",
                 id="two-options"),
    pytest.param(dict(seed=2), r"seed=1 -> 2", id="seed"),
    pytest.param(dict(recipe="attention-only"), r"recipe='full' -> 'attention-only'", id="recipe"),
    pytest.param(dict(loss_reduction="example"), r"loss_reduction='token' -> 'example'", id="loss-reduction"),
    pytest.param(dict(max_length=64), r"max_length=None -> 64", id="max-length"),
    pytest.param(dict(lr_scale={"multi_modal_projector.*": 2.0}), r"lr_scale=\{\} -> \{'multi_modal_projector", id="lr-scale"),
    pytest.param(dict(bf16=True), r"bf16=False -> True", id="bf16"),
    pytest.param(dict(data="{other}"), r"data='.*train.jsonl' -> '.*other.jsonl'", id="data-path"),
])
def test_resume_with_changed_options_is_refused_listing_them(base, data, finished, tmp_path, changes, message):
    out = stopped_at_2(finished, tmp_path / "run")
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace('"0.png"', f'"{data.parent / "0.png"}"'))
    changes = {k: (str(other) if v == "{other}" else v) for k, v in changes.items()}
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UsageError, match=r"cannot resume .*checkpoint-000002: the options differ from the run's .*"
                                         + message) as refused:
        fit(config(base, data, out, resume=True, **changes))
    assert f"resume with the run's options, or start a new run from that checkpoint (--model {out / 'checkpoint-000002'}" \
        f" --out NEW_DIR)" in str(refused.value)
    assert ckpt.latest(out).name == "checkpoint-000002" and (out / "metrics.jsonl").read_text() == before


def test_resume_may_change_what_does_not_shape_the_weights(base, data, finished, tmp_path):
    out = stopped_at_2(finished, tmp_path / "run")
    final = fit(config(base, data, out, resume=True, log_every=2, save_every=1, keep_checkpoints=1, eval_every=3,
                       activation_checkpointing=True, eval_max_new_tokens=3))
    assert same_weights(weights(final), weights(finished / "checkpoint-000004"))
    assert loss_steps(out) == [1, 2, 4]


def test_resume_after_the_data_file_changed_is_refused(base, data, tmp_path):
    path = tmp_path / "train.jsonl"
    lines = data.read_text().replace('"image": "', f'"image": "{data.parent}/').splitlines()
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    fit(config(base, path, out, steps=2))
    path.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(UsageError, match=r"train.jsonl changed since the run started"):
        fit(config(base, path, out, steps=2, resume=True))


# ------------------------------------------------------------------------------------ signals and kill -9

@pytest.mark.parametrize("sig, status", [pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
                                         pytest.param(signal.SIGINT, 130, id="SIGINT")])
def test_a_signal_saves_says_so_and_exits_like_a_shell(capsys, base, data, finished, tmp_path, monkeypatch, sig, status):
    out = tmp_path / "run"
    step = loop._train_step

    def step_then_signal(run, *rest):
        result = step(run, *rest)
        if run.step == 2 and not run.config.resume:
            os.kill(os.getpid(), sig)  # arrives during step 2's bookkeeping: the loop stops after it
        return result
    monkeypatch.setattr(loop, "_train_step", step_then_signal)
    args = ["train", "--model", base, "--data", data, "--out", out, "--steps", "4", "--batch-size", "2", "--lr", "3e-3",
            "--warmup-steps", "2", "--seed", "1"]
    code, stdout, err = main(capsys, *args)
    assert code == status and "final checkpoint" not in stdout
    assert error_line(err, alone=False) == (f"nanopali: error: interrupted by {sig.name} at step 2 of 4; checkpoint "
                                            f"saved to {out / 'checkpoint-000002'}; resume with --resume")
    assert ckpt.latest(out).name == "checkpoint-000002" and loss_steps(out) == [1, 2]
    code, stdout, err = main(capsys, *args, "--resume")
    assert code == 0 and stdout.strip() == f"final checkpoint: {out / 'checkpoint-000004'}"
    assert same_weights(weights(out / "checkpoint-000004"), weights(finished / "checkpoint-000004"))
    assert loss_steps(out) == [1, 2, 3, 4]


def test_after_kill_9_the_resumed_metrics_hold_each_step_once(base, data, finished, tmp_path):
    out = stopped_at_2(finished, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as f:  # what the killed run logged after its checkpoint at step 2
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    final = fit(config(base, data, out, resume=True))
    assert loss_steps(out) == [1, 2, 3, 4]
    assert metrics(out) == metrics(finished)[:2] + metrics(out)[2:] and metrics(out)[2]["loss"] != 1.0
    assert same_weights(weights(final), weights(finished / "checkpoint-000004"))


def test_training_interrupted_is_a_nanopali_error_with_the_shell_status():
    e = TrainingInterrupted(signal.SIGINT, 3, 10, Path("runs/x/checkpoint-000003"))
    assert isinstance(e, NanopaliError) and e.exit_code == 130 and e.step == 3
    assert str(e) == "interrupted by SIGINT at step 3 of 10; checkpoint saved to runs/x/checkpoint-000003; resume with --resume"
