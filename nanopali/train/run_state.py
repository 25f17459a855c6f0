"""One training run's state: the model, its optimizers and step, set up (or resumed) and saved as checkpoints.

    begun = begin_run(config, auxiliary) # processes, run directory checks, resumed state and options: every refusal
    run = start_run(config, auxiliary, begun)  # then the directory is changed, model, LoRA/recipe, optimizers
    run.save(run.step)                   # a checkpoint (checkpoint.py): the model files and the trainer state
    run.close()                          # removes the auxiliary loss's forward hook from the vision tower

The loop (loop.py) changes `run.step` and the parameters; everything else it needs is here. A resumed run
restores the newest checkpoint's optimizer, schedule, RNG and step (and under LoRA the base weights and the
adapters), in the order a fresh run creates them, so it continues bit for bit; it is refused when an option
that shapes the result (RESUME_OPTIONS), the number of processes, the training file's content or the
presence of an auxiliary loss differ from the run's start. An auxiliary loss gets its own AdamW and
schedule, kept in the trainer state, and a forward hook that stores the tower's output tokens.

The run directory's rules are TrainConfig's (loop.py): refused when it holds a run unless resuming or
overwriting, checked writable before anything is loaded, changed only once nothing can refuse the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanopali.errors import MissingFileError, UsageError
from nanopali.io.hf_checkpoint import save_state_dict
from nanopali.train import checkpoint, distributed, lora
from nanopali.train.objectives import Contrastive, Suffix, objective
from nanopali.train.recipes import apply_recipe, optimizer, schedule

if TYPE_CHECKING:
    from nanopali.train.loop import TrainConfig


@dataclass
class Run:
    """What a training run holds between steps; `wrapped` is `model` under DDP/FSDP (or `model` itself)."""

    config: TrainConfig
    d: distributed.Dist
    out: Path
    model: torch.nn.Module          # PaliGemma, or SigLIP for a contrastive objective
    wrapped: torch.nn.Module
    processor: object               # the model's Processor / SigLIPProcessor
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    auxiliary: torch.nn.Module | None = None
    aux_opt: torch.optim.Optimizer | None = None
    aux_sched: torch.optim.lr_scheduler.LRScheduler | None = None
    captured: list[torch.Tensor] = field(default_factory=list)  # the vision tower's outputs, appended by `hook`
    hook: torch.utils.hooks.RemovableHandle | None = None
    data_sha256: str | None = None  # the training file's digest, saved with each checkpoint
    saved_step: int | None = None   # the step of the checkpoint on disk that this run wrote or resumed from
    objective: Suffix | Contrastive = field(default_factory=Suffix)  # what the run optimizes (objectives.py)

    @property
    def per_step(self) -> int:
        """Examples per optimizer step over all processes."""
        return self.config.batch_size * self.d.world * self.config.grad_accum

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that get gradients: the model's trainable ones, then the auxiliary loss's."""
        model = [p for p in self.wrapped.parameters() if p.requires_grad]
        return model + list(self.auxiliary.parameters() if self.auxiliary is not None else [])

    def optimizers(self) -> list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]:
        """(optimizer, schedule) pairs, the model's first."""
        return [(self.opt, self.sched)] + ([(self.aux_opt, self.aux_sched)] if self.aux_opt is not None else [])

    def save(self, at: int) -> Path:
        """Checkpoint step `at` (every rank must call this: FSDP gathers the weights); returns its directory.
        A step already on disk from this run (saved before a signal, or the checkpoint it resumed from) is not
        written again."""
        if at == self.saved_step:
            return self.out / f"{checkpoint.PREFIX}{at:06d}"
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        opt_state = get_optimizer_state_dict(self.wrapped, self.opt, options=options)
        weights, adapter = _model_state(self.wrapped, self.config)
        path = self.out / f"{checkpoint.PREFIX}{at:06d}"
        if self.d.main:
            trainer_state = {"step": at, "optimizer": opt_state, "scheduler": self.sched.state_dict(),
                             "rng": checkpoint.rng_state(), "data_position": at * self.per_step,
                             "config": asdict(self.config), "data_sha256": self.data_sha256,
                             "paths": {k: str(Path(v).resolve()) for k in ("data", "model")
                                       if (v := getattr(self.config, k)) is not None}}
            if adapter is not None:
                trainer_state["lora"] = adapter
            if self.auxiliary is not None:
                trainer_state["auxiliary"] = {"module": self.auxiliary.state_dict(),
                                              "optimizer": self.aux_opt.state_dict(),
                                              "scheduler": self.aux_sched.state_dict()}
            write = _write_model(weights, distributed.unwrap(self.wrapped).config, self.processor)
            path = checkpoint.save(self.out, at, write, trainer_state, self.config.keep_checkpoints)
        self.d.barrier()
        self.saved_step = at
        return path

    def close(self) -> None:
        """Remove the forward hook from the vision tower (the model outlives the run)."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


@dataclass
class Begun:
    """What begin_run found before the model is loaded: processes, run directory, the checkpoint to resume
    from and its trainer state (None for a fresh run), and the processor (for checking the data)."""

    d: distributed.Dist
    out: Path
    resume_from: Path | None
    state: dict | None
    processor: object
    objective: Suffix | Contrastive


# The options that shape the weights a run ends with: a resume must not change them (TrainConfig's docstring).
RESUME_OPTIONS = ("recipe", "steps", "batch_size", "grad_accum", "lr", "lr_scale", "weight_decay", "warmup_steps",
                  "min_lr_ratio", "max_grad_norm", "bf16", "loss_reduction", "label_smoothing", "max_length", "seed",
                  "data", "objective", *lora.OPTIONS)


def begin_run(config: TrainConfig, auxiliary: torch.nn.Module | None = None) -> Begun:
    """Processes, the run directory (checked: created and writable, holding no run unless resuming or
    overwriting) and the resumed state (options compared) and the processor: every refusal before anything
    is loaded or changed. start_run then changes the directory (overwrite, trimmed metrics)."""
    d = distributed.setup(config.device)
    task = objective(config.objective)
    if auxiliary is not None and task.name != "suffix":
        raise UsageError(f"an auxiliary loss works on PaliGemma's vision tokens; --objective {task.name} takes none")
    if auxiliary is not None and d.world > 1:
        raise UsageError("an auxiliary loss trains in one process only: its parameters are outside DDP/FSDP")
    out = Path(config.out)
    _check_out(out, config)
    resume_from = checkpoint.latest(out) if config.resume else None
    state = checkpoint.load_state(resume_from) if resume_from is not None else None
    if state is not None:
        _check_resume(config, state, resume_from, auxiliary, d)
    try:
        processor = task.processor(resume_from or config.model)
    except FileNotFoundError as e:
        raise e if isinstance(e, MissingFileError) else MissingFileError(str(e)) from None
    return Begun(d, out, resume_from, state, processor, task)


def _prepare_out(begun: Begun, config: TrainConfig) -> None:
    """Rank 0 changes the run directory, once nothing can refuse the run any more: overwrite deletes the old
    run's files, a killed save's leftovers go, metrics.jsonl is trimmed to the resumed step (or removed)."""
    d, out, state = begun.d, begun.out, begun.state
    d.barrier()  # every rank has looked at the directory before rank 0 changes it
    if d.main:
        if config.overwrite:
            checkpoint.clear_run(out)
        checkpoint.remove_partial(out)
        _trim_metrics(out, state["step"] if state is not None else None)
    d.barrier()


def _check_out(out: Path, config: TrainConfig) -> None:
    """`out` is (or can be made) a directory nanopali can write, holding no run unless resuming or overwriting."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a run directory; name a new directory (or one holding a run "
                         "to --resume)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the run directory {out} ({e.strerror}); choose another --out") from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"nanopali")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write into the run directory {out} ({e.strerror}); choose another --out or make it "
                         "writable") from None
    found = checkpoint.run_files(out)
    if found and not (config.resume or config.overwrite):
        saved = [n for n in found if checkpoint.step_of(Path(n)) is not None]
        if len(saved) > 3:
            saved = [f"{saved[0]} … {saved[-1]} ({len(saved)} checkpoints)"]
        shown = ", ".join(saved + [n for n in found if checkpoint.step_of(Path(n)) is None])
        raise UsageError(f"{out} already holds a training run ({shown}); pass --resume to continue it or "
                         "--overwrite to delete it and start over")


def _check_resume(config: TrainConfig, state: dict, resume_from: Path, auxiliary, d: distributed.Dist) -> None:
    """Refuse a resume whose result would not be the run's: changed options (RESUME_OPTIONS), another number of
    processes, or an auxiliary loss given or left out unlike the run's start; one message with every difference."""
    saved, now = state.get("config", {}), asdict(config)
    paths = state.get("paths", {})
    names = RESUME_OPTIONS + (("model",) if config.lora_rank or saved.get("lora_rank") else ())
    changed = [f"{k}={saved[k]!r} -> {now[k]!r}" for k in names
               if k in saved and not _same(k, paths.get(k, saved[k]), now[k])]
    step, position = state.get("step", 0), state.get("data_position")
    same_batch = all(saved.get(k, now[k]) == now[k] for k in ("batch_size", "grad_accum"))
    if step and position and same_batch and position != step * config.batch_size * config.grad_accum * d.world:
        processes = position / (step * config.batch_size * config.grad_accum)
        changed.append(f"processes={processes:g} -> {d.world} (the global batch is batch_size x processes x grad_accum)")
    had = state.get("auxiliary") is not None
    if had != (auxiliary is not None):
        changed.append("the run was started " + ("with" if had else "without") + " an auxiliary loss and this call "
                       "passes " + ("none" if had else "one"))
    if changed:
        longer = ("; the schedule is defined by the steps a run started with, so training longer is a new run from "
                  "the checkpoint") if any(c.startswith("steps=") for c in changed) else ""
        raise UsageError(f"cannot resume {resume_from}: the options differ from the run's ({'; '.join(changed)}); "
                         f"resume with the run's options, or start a new run from that checkpoint (--model "
                         f"{resume_from} --out NEW_DIR){longer}")


def _same(name: str, saved, now) -> bool:
    """Whether a saved option equals the current one: paths resolved, sequences as tuples (LoRA targets as a set)."""
    if name in ("data", "model"):
        return (saved is None) == (now is None) and (saved is None or Path(saved).resolve() == Path(now).resolve())
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)):
        return sorted(saved) == sorted(now) if name == "lora_targets" else tuple(saved) == tuple(now)
    return saved == now


def _trim_metrics(out: Path, step: int | None) -> None:
    """metrics.jsonl keeps only what a resume from `step` does not write again: the lines up to that step (a run
    killed after its checkpoint wrote more, and broken last lines); a run starting afresh (None) removes it
    and the plot. Rewritten atomically."""
    metrics = out / checkpoint.METRICS
    if step is None:
        metrics.unlink(missing_ok=True)
        (out / checkpoint.PLOT).unlink(missing_ok=True)
        return
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = out / f".{checkpoint.METRICS}.tmp"
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics)


def start_run(config: TrainConfig, auxiliary: torch.nn.Module | None = None, begun: Begun | None = None,
              data_sha256: str | None = None) -> Run:
    """Set up a run: (begin_run unless given), model (resumed from the newest checkpoint with config.resume),
    LoRA or freezing recipe, optimizer and schedule, and the auxiliary loss's optimizer and hook.
    `data_sha256`, the training file's digest, is saved with each checkpoint; a resume refuses another."""
    begun = begun or begin_run(config, auxiliary)
    d, out, resume_from, state = begun.d, begun.out, begun.resume_from, begun.state
    saved_sha = (state or {}).get("data_sha256")
    if saved_sha and data_sha256 and saved_sha != data_sha256:
        raise UsageError(f"cannot resume {resume_from}: {config.data} changed since the run started (its sha256 "
                         "differs from the checkpoint's); resume with the data the run was started with, or start a new "
                         f"run from that checkpoint (--model {resume_from} --out NEW_DIR)")
    torch.manual_seed(config.seed)
    model, processor = _load_model(config, begun.objective, resume_from, state, d.device)
    wrapped = distributed.wrap(model, d, config.fsdp, begun.objective.layers(model))
    opt = optimizer(wrapped, config.lr, config.weight_decay, config.lr_scale)
    sched = schedule(opt, config.warmup_steps, config.steps, config.min_lr_ratio)
    run = Run(config, d, out, model, wrapped, processor, opt, sched, data_sha256=data_sha256,
              objective=begun.objective)
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        run.step = run.saved_step = state["step"]
    _attach_auxiliary(run, auxiliary, state)
    _check_lr_scale(run)
    _prepare_out(begun, config)  # the last refusal is behind: only now is anything in the run directory changed
    return run


def _check_lr_scale(run: Run) -> None:
    """Every lr_scale pattern names some parameter (of the model, or "auxiliary.*" of the auxiliary loss): a
    pattern that matches nothing is a typo that would silently train at the plain lr."""
    names = [n for n, _ in run.model.named_parameters()]
    names += [f"auxiliary.{n}" for n, _ in (run.auxiliary.named_parameters() if run.auxiliary is not None else [])]
    unused = [p for p in run.config.lr_scale if not any(fnmatchcase(n, p) for n in names)]
    if unused:
        raise UsageError(f"lr_scale patterns {unused} match no parameter; names look like "
                         f"{names[0]!r} (see model.named_parameters())")


def _load_model(config: TrainConfig, task: Suffix | Contrastive, resume_from: Path | None, state: dict | None,
                device: torch.device) -> tuple[torch.nn.Module, object]:
    """The model to train, in training mode with LoRA adapters or the freezing recipe applied, and its processor."""
    model = task.model(resume_from or config.model, device)
    processor = task.processor(resume_from or config.model)
    if state is not None and (config.lora_rank or state["config"].get("lora_rank")):
        lora.check_resume_options(state["config"], asdict(config))
        lora.restore_base_weights(model, config.model, config.lora_targets)  # the checkpoint holds merged weights
    if config.lora_rank:
        lora.apply(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets, config.recipe)
        if state is not None:
            lora.load_adapter(model, state["lora"])
    else:
        apply_recipe(model, config.recipe, task.recipes)
    model.gradient_checkpointing(config.activation_checkpointing)
    model.train()
    return model, processor


def _attach_auxiliary(run: Run, auxiliary: torch.nn.Module | None, state: dict | None) -> None:
    """Give the run its auxiliary loss: the optimizer and schedule (restored from a resumed run's state) and
    the forward hook on the vision tower that appends its output to run.captured; nothing without one."""
    saved = state.get("auxiliary") if state is not None else None
    if state is not None and (saved is None) != (auxiliary is None):
        raise UsageError("cannot resume: the run was started " + ("without" if saved is None else "with")
                         + " an auxiliary loss and this call passes " + ("one" if saved is None else "none"))
    if auxiliary is None:
        return
    config = run.config
    auxiliary.to(run.d.device).train()
    opt = optimizer(torch.nn.ModuleDict({"auxiliary": auxiliary}), config.lr, 0.0, config.lr_scale)  # "auxiliary.*"
    sched = schedule(opt, config.warmup_steps, config.steps, config.min_lr_ratio)
    if saved is not None:
        auxiliary.load_state_dict(saved["module"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
    run.auxiliary, run.aux_opt, run.aux_sched = auxiliary, opt, sched
    run.hook = run.model.vision.register_forward_hook(lambda module, args, output: run.captured.append(output))


def _model_state(model: torch.nn.Module, config: TrainConfig) -> tuple[dict, dict | None]:
    """(full weights in the Hugging Face layout, LoRA adapter tensors or None), on rank 0 only.

    Gathered from all ranks under FSDP (every rank must call this); other ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return lora.merge(state, config.lora_alpha / config.lora_rank) if config.lora_rank else (state, None)


def _write_model(state: dict, model_config, processor):
    """A function writing config.json, the weights and the processor files into a directory."""
    def write(path: Path) -> None:
        model_config.save_pretrained(path)
        save_state_dict(state, path)
        processor.save_pretrained(path)
    return write
