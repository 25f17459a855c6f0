"""The training loop: fine-tune (or train) PaliGemma on prefix/suffix examples, or a contrastive SigLIP on
image/text pairs, top to bottom.

    config = TrainConfig(model="ckpt", data="train.jsonl", out="runs/x", recipe="attention-only", steps=500)
    fit(config)                          # or fit(config, train_data=[{"image": ..., "prefix": ..., "suffix": ...}, ...])
    fit(TrainConfig(model="siglip", data="pairs.jsonl", objective="siglip"))    # {"image": ..., "text": ...}

What the loss is, which model and processor load, what a batch and an example are and how held-out data is
scored belong to the objective (objectives.py: "suffix" for PaliGemma, "siglip" / "clip" for SigLIP).

One step = grad_accum micro-batches of batch_size examples on each of the world-size processes;
the loss of the step is the mean over the suffix tokens of the whole global batch (or over its
examples), whatever the split. Checkpoints (checkpoint.py) are written every save_every steps,
at the end, and when SIGTERM/SIGINT arrives (fit then raises TrainingInterrupted); `resume=True`
continues from the newest one exactly. With lora_rank > 0 only LoRA adapters on the decoder train
(lora.py) and checkpoints hold the merged model.

`fit(..., auxiliary=module)` adds an auxiliary loss on the vision tower's output tokens:
`module(features (B, P, D), examples) -> scalar`, e.g. world/patch_warmup.PatchLoss on per-patch labels the
examples carry. Its parameters have their own AdamW on the same schedule, without weight decay, at lr
times the lr_scale matching "auxiliary.<name>"; they live in the trainer state (not in the model's
weights), so a resumed run continues them. It runs in one process only.

A mixture-of-experts decoder adds its router losses to the loss (models/paligemma.py, nn/losses.router_losses),
over each global micro-batch; metrics.jsonl logs them beside the suffix `loss` (router_balance_loss,
router_z_loss) with the tokens each expert of each sparse layer got since the last line (expert_counts), and
loss.png gets a second panel, the expert load (max / mean tokens per expert) of each layer.

The run's state (model, optimizers, step, checkpoints, the run directory's rules) is run_state.py; this
file is the loop over it.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from nanopali.errors import DataError, MissingFileError, NanopaliError, UsageError
from nanopali.nn.losses import REDUCTIONS
from nanopali.train import distributed, lora
from nanopali.train.checkpoint import METRICS, PLOT
from nanopali.train.data import Example, Pair, as_example, example_stream
from nanopali.train.objectives import OBJECTIVES, check_options
from nanopali.train.run_state import Run, begin_run, start_run


@dataclass
class TrainConfig:
    """The options of a training run (each is also a `nanopali train --option`).

    Run directory (`out`): a new or empty directory starts a run. One that already holds a run (checkpoints,
    `latest`, metrics.jsonl or loss.png) is refused unless `resume=True` continues it (from the checkpoint
    `latest` names; with no checkpoint yet the run starts from the beginning) or `overwrite=True` deletes
    those files (and nothing else there) and starts over; both at once are refused. `out` must be a
    directory nanopali can create and write: that is checked before anything is loaded.

    Resuming: the options that shape the result must equal those the run was started with, else the resume
    is refused with the list of differences: recipe, steps, batch_size, grad_accum, lr, lr_scale,
    weight_decay, warmup_steps, min_lr_ratio, max_grad_norm, bf16, loss_reduction, label_smoothing,
    max_length, seed, data (its path and its content) and the LoRA options (with LoRA also model, whose
    base weights are read again), and the number of processes. `steps` is among them: the cosine schedule
    is defined by the steps a run was started with, so to train longer, start a new run from the checkpoint
    (`model=<out>/checkpoint-N`, a new `out`). Options that do not change the weights may differ: out,
    eval, eval_every, eval_max_new_tokens, log_every, save_every, keep_checkpoints, skip_bad,
    activation_checkpointing, fsdp, device, resume, overwrite (and model without LoRA: the weights come
    from the checkpoint).

    Every value is checked here (a UsageError naming the option and what it must be): steps, batch_size,
    grad_accum, log_every, keep_checkpoints, eval_max_new_tokens >= 1; 0 <= warmup_steps <= steps; lr > 0
    and lr_scale values > 0, finite; weight_decay >= 0; min_lr_ratio in [0, 1]; label_smoothing in [0, 1);
    max_grad_norm >= 0 or None (0: no clipping); max_length >= 1 or None; save_every, eval_every >= 0
    (0: only at the end); lora_rank >= 0, lora_alpha > 0, lora_dropout in [0, 1), lora_targets among
    lora.TARGETS; recipe and loss_reduction among the known ones; and each value of its field's type.
    """

    model: str                          # checkpoint directory to start from
    objective: str = "suffix"           # suffix (PaliGemma) | siglip | clip (a contrastive SigLIP; objectives.py)
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
    max_grad_norm: float | None = 1.0   # 0 or None: no clipping
    bf16: bool = False                  # bf16 autocast (CPU and GPU); weights stay in float32
    activation_checkpointing: bool = False
    loss_reduction: str = "token"       # token (transformers) | example (big_vision)
    label_smoothing: float = 0.0
    max_length: int | None = None
    skip_bad: bool = False              # skip (and count) bad JSONL lines instead of stopping at the first
    seed: int = 0
    save_every: int = 0                 # 0: only at the end
    keep_checkpoints: int = 3
    eval_every: int = 0                 # 0: only at the end (when there is eval data)
    eval_max_new_tokens: int = 32
    log_every: int = 1
    resume: bool = False                # continue the run in `out` (or start it when it has no checkpoint yet)
    overwrite: bool = False             # delete the run in `out` (its checkpoints, metrics, plot) and start over
    fsdp: bool = False
    device: str = "auto"
    # LoRA (lora.py, needs `pip install nanopali[lora]`): adapters of this rank on the decoder's linear
    # layers train and the base model is frozen; recipe then names base parameters trained in full
    # besides ("full" = none). Checkpoints hold the merged model.
    lora_rank: int = 0                  # 0: no LoRA
    lora_alpha: float = 16.0            # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = tuple(lora.TARGETS)  # among q/k/v/o_proj, gate/up/down_proj

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, str(f.type), getattr(self, f.name)))
        _check_values(self)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read options from a JSON file; keyword overrides (e.g. from the command line) win."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingFileError(f"training config {path} does not exist") from None
        except IsADirectoryError:
            raise UsageError(f"training config {path} is a directory, not a JSON file") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"training config {path} is not UTF-8 text (byte {e.start}); expected a JSON object") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"training config {path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except OSError as e:
            raise UsageError(f"cannot read training config {path} ({e.strerror})") from None
        if not isinstance(values, dict):
            raise UsageError(f"training config {path}: expected a JSON object of options, got {type(values).__name__}")
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"{path}: unknown training options {sorted(unknown)}")
        try:
            return cls(**{**values, **overrides})
        except TypeError as e:  # a required option (model) that neither the file nor the overrides give
            raise UsageError(f"{path}: {e}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _typed(name: str, annotation: str, value):
    """`value` checked against the field's annotation ("int", "float | None", "tuple[str, ...]" …), normalised
    (an int for a float, a list for a tuple); a UsageError naming the option otherwise."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    base, number = kinds[0], (int, float)
    if base == "bool":
        ok, what = isinstance(value, bool), "true or false"
    elif base == "int":
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif base == "float":
        ok, what = isinstance(value, number) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif base == "str":
        ok, what = isinstance(value, str) and value != "", "a non-empty string"
    elif base.startswith("dict"):
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, number) and not isinstance(v, bool)
                                             for k, v in value.items())
        what = 'an object of name pattern: number, e.g. {"multi_modal_projector.*": 10}'
        value = {k: float(v) for k, v in value.items()} if ok else value
    elif base.startswith("tuple"):
        ok, what = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of names"
        value = tuple(value) if ok else value
    else:  # a field of a type this function does not know: a bug, not a user mistake
        raise TypeError(f"TrainConfig.{name}: unsupported annotation {annotation!r}")
    if not ok:
        raise UsageError(f"training option {name} ({_flag(name)}) must be {what}{' or null' if 'None' in kinds else ''}, "
                         f"got {value!r}")
    return value


def _check_values(c: TrainConfig) -> None:
    """The ranges of TrainConfig's docstring; a UsageError naming the first option outside its range."""
    finite = math.isfinite
    rules = [
        ("steps", c.steps >= 1, "at least 1"),
        ("batch_size", c.batch_size >= 1, "at least 1"),
        ("grad_accum", c.grad_accum >= 1, "at least 1"),
        ("lr", finite(c.lr) and c.lr > 0, "a finite number > 0"),
        ("lr_scale", all(finite(s) and s > 0 for s in c.lr_scale.values()),
         "finite numbers > 0 (to freeze parameters use --recipe)"),
        ("weight_decay", finite(c.weight_decay) and c.weight_decay >= 0, "a finite number >= 0"),
        ("warmup_steps", 0 <= c.warmup_steps <= c.steps, f"between 0 and steps ({c.steps})"),
        ("min_lr_ratio", 0 <= c.min_lr_ratio <= 1, "between 0 and 1"),
        ("max_grad_norm", c.max_grad_norm is None or c.max_grad_norm >= 0, "a number >= 0 (0: no clipping)"),
        ("loss_reduction", c.loss_reduction in REDUCTIONS, f"one of {', '.join(REDUCTIONS)}"),
        ("label_smoothing", 0 <= c.label_smoothing < 1, "at least 0 and below 1"),
        ("max_length", c.max_length is None or c.max_length >= 1, "at least 1"),
        ("save_every", c.save_every >= 0, "at least 0 (0: only at the end)"),
        ("keep_checkpoints", c.keep_checkpoints >= 1, "at least 1"),
        ("eval_every", c.eval_every >= 0, "at least 0 (0: only at the end)"),
        ("eval_max_new_tokens", c.eval_max_new_tokens >= 1, "at least 1"),
        ("log_every", c.log_every >= 1, "at least 1"),
        ("objective", c.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
        ("lora_rank", c.lora_rank >= 0, "at least 0 (0: no LoRA)"),
        ("lora_alpha", finite(c.lora_alpha) and c.lora_alpha > 0, "a finite number > 0"),
        ("lora_dropout", 0 <= c.lora_dropout < 1, "at least 0 and below 1"),
        ("lora_targets", bool(c.lora_targets) and all(t in lora.TARGETS for t in c.lora_targets),
         f"one or more of {', '.join(lora.TARGETS)}"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise UsageError(f"training option {name} ({_flag(name)}) must be {rule}, got {getattr(c, name)!r}")
    check_options(c)  # the recipe and the options that depend on the objective
    if c.resume and c.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         f"{c.out}, --overwrite deletes it and starts over; pass one of them")


class TrainingInterrupted(NanopaliError):
    """fit stopped on SIGTERM or SIGINT after saving a checkpoint; resume=True continues from it.

    `signal`, `step`, `checkpoint` (the saved folder); `exit_code` is what a shell reports for the signal
    (128 + its number: 130 for SIGINT, 143 for SIGTERM), which `nanopali train` exits with."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: Path):
        self.signal, self.step, self.checkpoint = signal.Signals(signum), step, checkpoint
        super().__init__(f"interrupted by {self.signal.name} at step {step} of {steps}; checkpoint saved to "
                         f"{checkpoint}; resume with --resume")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then saves and stops)."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _plot(metrics_file: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in _records(metrics_file) if "loss" in r]
    if not rows:
        return
    experts = [r for r in rows if "expert_counts" in r]
    fig, axes = plt.subplots(1, 2 if experts else 1, figsize=(11 if experts else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
    if experts:  # per sparse layer: tokens of its busiest expert / the mean over its experts (1 = balanced)
        ax = axes[0, 1]
        load = [[max(c) / max(sum(c) / len(c), 1e-9) for c in r["expert_counts"]] for r in experts]
        for layer, line in enumerate(zip(*load)):
            ax.plot([r["step"] for r in experts], line, label=f"sparse layer {layer}", lw=1)
        ax.set_xlabel("step"), ax.set_ylabel("expert load (max / mean)"), ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _records(metrics_file: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] if metrics_file.is_file() else []


def fit(config: TrainConfig, train_data=None, eval_data=None, auxiliary: torch.nn.Module | None = None) -> Path:
    """Train; return the final checkpoint directory.

    Before anything heavy: the run directory is checked (TrainConfig's rules: new, resumed, or overwritten),
    a resume's options compared with the checkpoint's, and config.data / config.eval opened with every line
    checked (JsonlDataset with the model's processor and max_length). With skip_bad the skipped lines are
    reported on stderr and, for a run that starts at step 0, as the first metrics.jsonl record
    {"step": 0, "skipped_examples": N, "skipped_reasons": {reason: count}, ...}.

    metrics.jsonl holds one line per logged step (and eval records): a resumed run first drops the lines of
    steps after its checkpoint (written by a run killed before its next checkpoint), so no step repeats.

    On SIGTERM or SIGINT the step in progress finishes, a checkpoint is saved, and TrainingInterrupted is
    raised (it names the step, the checkpoint and the signal; `nanopali train` exits 130 / 143 with it).
    Resuming a run that is already complete trains nothing and returns its final checkpoint (running the
    held-out evaluation if the run stopped before it).
    """
    begun = begin_run(config, auxiliary)
    run = stop = None
    try:
        train, held_out, sources = _datasets(config, train_data, eval_data, begun)
        run = start_run(config, auxiliary, begun, data_sha256=getattr(train, "sha256", None))
        metrics = run.out / METRICS
        _report_skipped(run, metrics, sources, to_metrics=begun.state is None)
        stream = example_stream(train, config.seed, start=run.step * run.per_step, fields=run.objective.fields)
        was_complete = run.step >= config.steps
        bar = tqdm(total=config.steps, initial=run.step, disable=not run.d.main, desc="train", dynamic_ncols=True)
        # No host-device sync between log steps (losses and norms stay tensors until then, counts come from the
        # CPU batch, pinned copies): on a GPU the next batch is prepared while the last step's kernels still run.
        meter = _Meter()
        with _StopSignal() as stop:
            while run.step < config.steps and not stop.requested:
                micro = _micro_batches(run, stream, meter)
                loss, aux_loss, grad_norm, lr = _train_step(run, micro, meter)
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
        evaluated = was_complete and any(k.startswith("eval/") for r in _records(metrics) if r.get("step") == run.step
                                         for k in r)
        if held_out and not stop.requested and not evaluated:
            _log(run, metrics, {"step": run.step, **_evaluate(run, held_out)})
        if run.d.main and metrics.is_file():
            _plot(metrics, run.out / PLOT)
    finally:
        if run is not None:
            run.close()
    distributed.teardown()
    if stop.requested:
        raise TrainingInterrupted(stop.signum, run.step, config.steps, final)
    return final


def _datasets(config: TrainConfig, train_data, eval_data, begun) -> tuple[object, list[Example | Pair] | None, list]:
    """The training examples (train_data, else config.data's JSONL, checked with the processor), the held-out
    ones as Examples (Pairs for a contrastive objective) or None, and the JsonlDatasets opened (whose skipped
    lines are reported)."""
    task, opened = begun.objective, []
    if train_data is not None:
        train = train_data
    elif config.data:
        train = task.dataset(config.data, config, begun.processor)
        opened.append(("", train))
    else:
        raise UsageError("no training data: set data= (a JSONL file, --data) or pass train_data=")
    held_out = eval_data
    if held_out is None and config.eval:
        held_out = task.dataset(config.eval, config, begun.processor, held_out=True)
        opened.append(("eval_", held_out))
    held_out = ([as_example(e, f"eval example {i}", task.fields) for i, e in enumerate(held_out)]
                if held_out is not None else None)
    return train, held_out, opened


def _report_skipped(run: Run, metrics: Path, opened: list, to_metrics: bool) -> None:
    """Say on stderr how many lines of each JSONL were skipped and why; for a run starting at step 0 also
    as metrics.jsonl's first record."""
    record = {}
    for key, ds in opened:
        if ds.skipped and run.d.main:
            tqdm.write(f"nanopali: {ds.path}: {ds.skip_summary()} (first: {ds.skipped[0]})", file=sys.stderr)
            record.update({f"{key}data": str(ds.path), f"{key}skipped_examples": len(ds.skipped),
                           f"{key}skipped_reasons": dict(ds.skipped_reasons), f"{key}skipped_lines": ds.skipped[:100]})
        if ds.truncated and run.d.main:  # contrastive pairs whose text is cut to the text tower's length
            tqdm.write(f"nanopali: note: {ds.path}: {ds.truncated} texts are longer than the text tower's "
                       f"{run.processor.max_length} tokens and are cut", file=sys.stderr)
            record.update({f"{key}data": str(ds.path), f"{key}truncated_texts": ds.truncated})
    if record and to_metrics:
        _log(run, metrics, {"step": 0, **record})


@dataclass
class _Meter:
    """Steps and tokens since the last log line, and when it was written: the throughput to log."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0
    router: dict[str, torch.Tensor] = field(default_factory=dict)  # MoE: summed router losses, expert counts


def _micro_batches(run: Run, stream: Iterator[Example], meter: _Meter) -> list[tuple[dict, list[Example], int]]:
    """The next step's grad_accum micro-batches of this process, each (batch on the device, its examples, its
    loss divisor); every process draws the whole global batch from the stream and keeps its own slice."""
    config, d = run.config, run.d
    micro = []
    for _ in range(config.grad_accum):
        try:
            examples = [next(stream) for _ in range(config.batch_size * d.world)]
        except StopIteration:  # an iterable (not a Sequence, which repeats in epochs) that ran out
            raise DataError(f"the training data ran out at step {run.step + 1} of {config.steps}: it needs "
                            f"{config.steps * run.per_step} examples; pass a sequence (repeated in epochs) or more "
                            "examples, or fewer steps") from None
        mine = examples[d.rank * config.batch_size:(d.rank + 1) * config.batch_size]
        batch, n, tokens = run.objective.batch(run.processor, mine, config)
        meter.tokens += tokens
        micro.append((_to_device(batch, d.device), mine, n))
    return micro


def _train_step(run: Run, micro: list[tuple[dict, list[Example], int]], meter: _Meter):
    """One optimizer step over the micro-batches; returns (language-model loss, auxiliary loss, gradient norm
    or None, the step's lr), the losses as tensors (no host-device sync until a log step reads them). A
    mixture-of-experts decoder's router losses and expert counts are added up in meter.router."""
    config, d, wrapped = run.config, run.d, run.wrapped
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    # divide by the count over the global batch, times world size (DDP/FSDP average the ranks)
    total = d.sum(sum(n for _, _, n in micro))
    # router losses: routing statistics over each global micro-batch, the step's the mean over its micro-batches
    router = dict(router_reduce=d.all_reduce if d.world > 1 else None, router_scale=d.world / len(micro))
    step_loss = aux_loss = 0.0
    for i, (batch, examples, _) in enumerate(micro):
        sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
        with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast:
            out = run.objective.forward(wrapped, batch, config, denominator=max(total, 1) / d.world, **router)
            loss = lm_loss = out.loss
            if getattr(out, "expert_counts", None) is not None:  # mixture of experts: `loss` has the router losses
                lm_loss = out.lm_loss
                _add_router(meter, out, len(micro))
            if run.auxiliary is not None:  # on the features this forward just made: (B, P, D)
                aux = run.auxiliary(run.captured.pop(), examples) / len(micro)
                run.captured.clear()  # what evaluation's forwards added
                aux_loss = aux_loss + aux.detach()
                loss = loss + aux
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
    if meter.router:  # mixture of experts: per-step means of the router losses, expert counts since the last line
        record.update({f"router_{k}": run.d.sum(float(v)) / meter.steps for k, v in meter.router.items()
                       if k != "counts"}, expert_counts=meter.router["counts"].round().long().tolist())
    _log(run, metrics, record)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{examples_per_s:.1f}")


def _add_router(meter: _Meter, out, micro_batches: int) -> None:
    """Add a forward's router losses (this process's share of its global micro-batch's, over the step's
    micro-batches: summed over the processes at the log line) and its global micro-batch's expert counts
    (the same on every process) to meter.router."""
    for key, value in (("balance_loss", out.balance_loss / micro_batches), ("z_loss", out.z_loss / micro_batches),
                       ("counts", out.expert_counts)):
        meter.router[key] = meter.router.get(key, 0) + value.detach()


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
            model = distributed.unwrap(run.wrapped)
            result = {f"eval/{k}": v for k, v in run.objective.evaluate(model, run.processor, examples, config).items()}
    d.barrier()
    return result


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A CPU batch on `device`; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
