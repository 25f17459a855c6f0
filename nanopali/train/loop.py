"""The training loop: fine-tune (or train) PaliGemma on prefix/suffix examples, top to bottom.

    config = TrainConfig(model="ckpt", data="train.jsonl", out="runs/x", recipe="attention-only", steps=500)
    fit(config)                          # or fit(config, train_data=[{"image": ..., "prefix": ..., "suffix": ...}, ...])

One step = grad_accum micro-batches of batch_size examples on each of the world-size processes;
the loss of the step is the mean over the suffix tokens of the whole global batch (or over its
examples), whatever the split. Checkpoints (checkpoint.py) are written every save_every steps,
at the end, and when SIGTERM/SIGINT arrives; `resume=True` continues from the newest one exactly.
With lora_rank > 0 only LoRA adapters on the decoder train (lora.py) and checkpoints hold the merged model.

`fit(..., auxiliary=module)` adds an auxiliary loss on the vision tower's output tokens:
`module(features (B, P, D), examples) -> scalar`, e.g. world/patch_warmup.PatchLoss on per-patch labels the
examples carry. Its parameters have their own AdamW on the same schedule, without weight decay, at lr
times the lr_scale matching "auxiliary.<name>"; they live in the trainer state (not in the model's
weights), so a resumed run continues them. It runs in one process only.

The run's state (model, optimizers, step, checkpoints) is run_state.py; this file is the loop over it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from nanopali.errors import MissingFileError, UsageError
from nanopali.nn.losses import count
from nanopali.train import distributed, lora
from nanopali.train.data import Example, JsonlDataset, as_example, collate, example_stream
from nanopali.train.evaluate import evaluate
from nanopali.train.run_state import Run, start_run


@dataclass
class TrainConfig:
    model: str                          # checkpoint directory to start from
    out: str = "runs/train"             # run directory: checkpoints, metrics.jsonl, loss.png
    data: str | None = None             # training JSONL (or pass train_data= to fit)
    eval: str | None = None             # held-out JSONL (or pass eval_data= to fit)
    recipe: str = "full"                # full | freeze-vision | attention-only | projector-only
    steps: int = 100
    batch_size: int = 8                 # examples per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scale: dict[str, float] = field(default_factory=dict)  # {"multi_modal_projector.*": 10.0}
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool = False                  # bf16 autocast (CPU and GPU); weights stay in float32
    activation_checkpointing: bool = False
    loss_reduction: str = "token"       # token (transformers) | example (big_vision)
    label_smoothing: float = 0.0
    max_length: int | None = None
    skip_bad: bool = False
    seed: int = 0
    save_every: int = 0                 # 0: only at the end
    keep_checkpoints: int = 3
    eval_every: int = 0                 # 0: only at the end (when there is eval data)
    eval_max_new_tokens: int = 32
    log_every: int = 1
    resume: bool = False
    fsdp: bool = False
    device: str = "auto"
    # LoRA (lora.py, needs `pip install nanopali[lora]`): adapters of this rank on the decoder's linear
    # layers train and the base model is frozen; recipe then names base parameters trained in full
    # besides ("full" = none). Checkpoints hold the merged model.
    lora_rank: int = 0                  # 0: no LoRA
    lora_alpha: float = 16.0            # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = tuple(lora.TARGETS)  # among q/k/v/o_proj, gate/up/down_proj

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read options from a JSON file; keyword overrides (e.g. from the command line) win."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError as e:  # the CLI prints these as one line, with their own messages
            raise MissingFileError(e.errno, e.strerror, e.filename) from None
        except json.JSONDecodeError as e:
            raise UsageError(str(e)) from None
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"{path}: unknown training options {sorted(unknown)}")
        return cls(**{**values, **overrides})


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then saves and stops)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _plot(metrics_file: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if '"loss"' in line]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def fit(config: TrainConfig, train_data=None, eval_data=None, auxiliary: torch.nn.Module | None = None) -> Path:
    """Train; return the final checkpoint directory."""
    run = start_run(config, auxiliary)
    try:
        train, held_out = _datasets(config, train_data, eval_data)
        stream = example_stream(train, config.seed, start=run.step * run.per_step)
        metrics = run.out / "metrics.jsonl"
        bar = tqdm(total=config.steps, initial=run.step, disable=not run.d.main, desc="train", dynamic_ncols=True)
        # No host-device sync between log steps (losses and norms stay tensors until then, counts come from the
        # CPU batch, pinned copies): on a GPU the next batch is prepared while the last step's kernels still run.
        meter = _Meter()
        with _StopSignal() as stop:
            while run.step < config.steps and not stop.requested:
                micro = _micro_batches(run, stream, meter)
                loss, aux_loss, grad_norm, lr = _train_step(run, micro)
                meter.steps += 1
                bar.update(1)
                if run.step % config.log_every == 0 or run.step == config.steps:
                    _log_step(run, metrics, bar, meter, loss, aux_loss, grad_norm, lr)
                    meter = _Meter()
                if config.save_every and run.step % config.save_every == 0 and run.step < config.steps:
                    run.save(run.step)
                if held_out and config.eval_every and run.step % config.eval_every == 0 and run.step < config.steps:
                    _log(run, metrics, {"step": run.step, **_evaluate(run, held_out)})
        bar.close()
        final = run.save(run.step)
        if held_out and not stop.requested:
            _log(run, metrics, {"step": run.step, **_evaluate(run, held_out)})
        if run.d.main and metrics.is_file():
            _plot(metrics, run.out / "loss.png")
    finally:
        run.close()
    distributed.teardown()
    return final


def _datasets(config: TrainConfig, train_data, eval_data) -> tuple[object, list[Example] | None]:
    """The training examples (train_data, else config.data's JSONL) and the held-out ones as Examples, or None."""
    train = train_data if train_data is not None else JsonlDataset(config.data, config.skip_bad) if config.data else None
    if train is None:
        raise UsageError("no training data: set data= (a JSONL file) or pass train_data=")
    held_out = eval_data if eval_data is not None else JsonlDataset(config.eval, config.skip_bad) if config.eval else None
    held_out = [as_example(e, f"eval example {i}") for i, e in enumerate(held_out)] if held_out is not None else None
    return train, held_out


@dataclass
class _Meter:
    """Steps and tokens since the last log line, and when it was written: the throughput to log."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0


def _micro_batches(run: Run, stream: Iterator[Example], meter: _Meter) -> list[tuple[dict, list[Example], int]]:
    """The next step's grad_accum micro-batches of this process, each (batch on the device, its examples, its
    loss divisor); every process draws the whole global batch from the stream and keeps its own slice."""
    config, d = run.config, run.d
    micro = []
    for _ in range(config.grad_accum):
        examples = [next(stream) for _ in range(config.batch_size * d.world)]
        mine = examples[d.rank * config.batch_size:(d.rank + 1) * config.batch_size]
        batch = collate(run.processor, mine, config.max_length)
        n = count(batch["labels"], config.loss_reduction)
        meter.tokens += int(batch["attention_mask"].sum())
        micro.append((_to_device(batch, d.device), mine, n))
    return micro


def _train_step(run: Run, micro: list[tuple[dict, list[Example], int]]):
    """One optimizer step over the micro-batches; returns (language-model loss, auxiliary loss, gradient norm
    or None, the step's lr), the losses as tensors (no host-device sync until a log step reads them)."""
    config, d, wrapped = run.config, run.d, run.wrapped
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    # divide by the count over the global batch, times world size (DDP/FSDP average the ranks)
    total = d.sum(sum(n for _, _, n in micro))
    step_loss = aux_loss = 0.0
    for i, (batch, examples, _) in enumerate(micro):
        sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
        with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast:
            lm_loss = wrapped(**batch, reduction=config.loss_reduction, label_smoothing=config.label_smoothing,
                              denominator=max(total, 1) / d.world).loss
            loss = lm_loss
            if run.auxiliary is not None:  # on the features this forward just made: (B, P, D)
                aux = run.auxiliary(run.captured.pop(), examples) / len(micro)
                run.captured.clear()  # what evaluation's forwards added
                aux_loss = aux_loss + aux.detach()
                loss = lm_loss + aux
        loss.backward()
        step_loss = step_loss + lm_loss.detach() / d.world
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.trained_parameters(), config.max_grad_norm)
                 if config.max_grad_norm else None)
    lr = run.sched.get_last_lr()[0]
    for opt, sched in run.optimizers():
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    run.step += 1
    return step_loss, aux_loss, grad_norm, lr


def _log_step(run: Run, metrics: Path, bar: tqdm, meter: _Meter, loss, aux_loss, grad_norm, lr: float) -> None:
    """The step's metrics.jsonl line (loss summed over the ranks, throughput since the last line) and progress bar."""
    loss = run.d.sum(float(loss))
    seconds, tokens = time.perf_counter() - meter.start, run.d.sum(meter.tokens)
    examples_per_s = run.per_step * meter.steps / seconds
    record = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
              "examples_per_s": examples_per_s, "tokens_per_s": tokens / seconds}
    if run.auxiliary is not None:
        record["aux_loss"] = float(aux_loss)
    _log(run, metrics, record)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{examples_per_s:.1f}")


def _log(run: Run, metrics: Path, record: dict) -> None:
    """Append a line to metrics.jsonl (rank 0 only)."""
    if run.d.main:
        with metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _evaluate(run: Run, examples: list[Example]) -> dict:
    """Evaluate on rank 0 (other ranks wait), or on every rank under FSDP, whose layers need all ranks."""
    config, d, result = run.config, run.d, {}
    if d.main or config.fsdp:
        with distributed.root_unsharded(run.wrapped):
            result = {f"eval/{k}": v for k, v in evaluate(distributed.unwrap(run.wrapped), run.processor, examples,
                                                          config.batch_size, config.eval_max_new_tokens).items()}
    d.barrier()
    return result


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A CPU batch on `device`; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
