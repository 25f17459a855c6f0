"""Data-parallel training on CPU: 2 gloo processes under torchrun equal 1 process on the same global batch.

Each distributed run is a real `python -m torch.distributed.run --nproc_per_node=2 --standalone`
of a two-line script calling `fit`, with batch_size=2 per rank; the reference is an in-process
`fit` with batch_size=4 on the same data and seed, so every step sees the same 4 examples. The
examples' suffixes have different lengths, so the two ranks hold different numbers of labelled
tokens: a loss normalised per rank instead of over the global batch would change the logged loss
and gradient norm, which are compared too (Adam alone would hide a constant factor on the gradient).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train import assert_same_training, base, data, weights  # noqa: F401  (base, data are fixtures)
from torchrun import run_torchrun

from nanopali.train import TrainConfig, fit
from nanopali.train import checkpoint as ckpt

STEPS = 4
SCRIPT = """\
import json, sys
from nanopali.train import TrainConfig, fit
fit(TrainConfig(**json.loads(sys.argv[1])))
"""


def options(base, data, out, **kw) -> dict:
    return {**dict(model=str(base), data=str(data), out=str(out), steps=STEPS, batch_size=2, lr=3e-3, warmup_steps=2,
                   seed=1, save_every=2, keep_checkpoints=5), **kw}


def torchrun(tmp_path: Path, config: dict) -> Path:
    """Run fit(TrainConfig(**config)) in 2 processes (gloo on CPU); return the run directory."""
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    run_torchrun(tmp_path, script, json.dumps(config))
    return Path(config["out"])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(distributed: Path, single: Path) -> None:
    """Same weights (AdamW tolerance) and the same logged loss and gradient norm at every step."""
    assert_same_training(weights(single / "checkpoint-000004"), weights(distributed / "checkpoint-000004"))
    for a, b in zip(metrics(single), metrics(distributed), strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "grad_norm", "eval/caption/exact_match"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), f"step {a['step']}: {key} {b[key]} != {a[key]}"


def resume_from_step_2(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run's directory holding only checkpoint 2, as if it had stopped there."""
    out = tmp_path / f"{run.name}-resumed"
    shutil.copytree(run / "checkpoint-000002", out / "checkpoint-000002")
    (out / ckpt.LATEST).write_text("checkpoint-000002\n")
    return out


@pytest.fixture(scope="module")
def single(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    fit(TrainConfig(**options(base, data, out, batch_size=4, eval=str(data), eval_max_new_tokens=4)))
    return out


@pytest.fixture(scope="module")
def ddp(base, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    return torchrun(folder, options(base, data, folder / "ddp", eval=str(data), eval_max_new_tokens=4))


@pytest.fixture(scope="module")
def fsdp(base, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    return torchrun(folder, options(base, data, folder / "fsdp", fsdp=True, eval=str(data), eval_max_new_tokens=4))


def test_ddp_equals_one_process_on_the_global_batch(ddp, single):
    assert_same_run(ddp, single)
    assert not torch.equal(weights(ddp / "checkpoint-000004")["multi_modal_projector.linear.weight"],
                           weights(ddp / "checkpoint-000002")["multi_modal_projector.linear.weight"])


def test_only_rank_0_logs_and_writes_checkpoints(ddp):
    rows = metrics(ddp)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1)), "one metrics line per step"
    assert [r["step"] for r in rows if "loss" not in r] == [STEPS], "one evaluation line, at the end"
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoint-000002", "checkpoint-000004", "latest", "loss.png",
                                                     "metrics.jsonl"]
    assert ckpt.latest(ddp).name == "checkpoint-000004"


def test_ddp_with_gradient_accumulation_equals_one_process(base, data, single, tmp_path):
    out = torchrun(tmp_path, options(base, data, tmp_path / "accum", batch_size=1, grad_accum=2, eval=str(data),
                                     eval_max_new_tokens=4))
    assert_same_run(out, single)


def test_ddp_resume_equals_the_uninterrupted_run(base, data, ddp, tmp_path):
    out = torchrun(tmp_path, options(base, data, resume_from_step_2(ddp, tmp_path), resume=True))
    a, b = weights(ddp / "checkpoint-000004"), weights(out / "checkpoint-000004")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert [r["step"] for r in metrics(out)] == [3, 4]


def test_fsdp_equals_one_process_on_the_global_batch(fsdp, single):
    """fully_shard works on CPU with gloo; the checkpoint gathers the full model onto rank 0.

    The run also evaluates at the end (generate() under FSDP needs the root's parameters gathered).
    """
    assert_same_run(fsdp, single)
    assert sorted(p.name for p in fsdp.glob(f"{ckpt.PREFIX}*")) == ["checkpoint-000002", "checkpoint-000004"]


def test_fsdp_resume_equals_the_uninterrupted_run(base, data, fsdp, tmp_path):
    out = torchrun(tmp_path, options(base, data, resume_from_step_2(fsdp, tmp_path), resume=True, fsdp=True))
    a, b = weights(fsdp / "checkpoint-000004"), weights(out / "checkpoint-000004")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume under FSDP"
