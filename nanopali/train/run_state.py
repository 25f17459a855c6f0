"""One training run's state: the model, its optimizers and step, set up (or resumed) and saved as checkpoints.

    run = start_run(config, auxiliary)   # distributed setup, resume, model, LoRA or freezing recipe, optimizers
    run.save(run.step)                   # a checkpoint (checkpoint.py): the model files and the trainer state
    run.close()                          # removes the auxiliary loss's forward hook from the vision tower

The loop (loop.py) changes `run.step` and the parameters; everything else it needs is here. A resumed run
restores the newest checkpoint's optimizer, schedule, RNG and step (and under LoRA the base weights and the
adapters), in the order a fresh run creates them, so it continues bit for bit. An auxiliary loss gets its own
AdamW and schedule, kept in the trainer state, and a forward hook that stores the tower's output tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanopali.errors import UsageError
from nanopali.inputs.processor import Processor
from nanopali.io.hf_checkpoint import save_state_dict
from nanopali.models.paligemma import PaliGemma
from nanopali.train import checkpoint, distributed, lora
from nanopali.train.recipes import apply_recipe, optimizer, schedule

if TYPE_CHECKING:
    from nanopali.train.loop import TrainConfig


@dataclass
class Run:
    """What a training run holds between steps; `wrapped` is `model` under DDP/FSDP (or `model` itself)."""

    config: TrainConfig
    d: distributed.Dist
    out: Path
    model: PaliGemma
    wrapped: torch.nn.Module
    processor: Processor
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    auxiliary: torch.nn.Module | None = None
    aux_opt: torch.optim.Optimizer | None = None
    aux_sched: torch.optim.lr_scheduler.LRScheduler | None = None
    captured: list[torch.Tensor] = field(default_factory=list)  # the vision tower's outputs, appended by `hook`
    hook: torch.utils.hooks.RemovableHandle | None = None

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
        """Checkpoint step `at` (every rank must call this: FSDP gathers the weights); returns its directory."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        opt_state = get_optimizer_state_dict(self.wrapped, self.opt, options=options)
        weights, adapter = _model_state(self.wrapped, self.config)
        path = self.out / f"{checkpoint.PREFIX}{at:06d}"
        if self.d.main:
            trainer_state = {"step": at, "optimizer": opt_state, "scheduler": self.sched.state_dict(),
                             "rng": checkpoint.rng_state(), "data_position": at * self.per_step,
                             "config": asdict(self.config)}
            if adapter is not None:
                trainer_state["lora"] = adapter
            if self.auxiliary is not None:
                trainer_state["auxiliary"] = {"module": self.auxiliary.state_dict(),
                                              "optimizer": self.aux_opt.state_dict(),
                                              "scheduler": self.aux_sched.state_dict()}
            write = _write_model(weights, distributed.unwrap(self.wrapped).config, self.processor)
            path = checkpoint.save(self.out, at, write, trainer_state, self.config.keep_checkpoints)
        self.d.barrier()
        return path

    def close(self) -> None:
        """Remove the forward hook from the vision tower (the model outlives the run)."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


def start_run(config: TrainConfig, auxiliary: torch.nn.Module | None = None) -> Run:
    """Set up a run: processes, run directory, model (resumed from the newest checkpoint with config.resume),
    LoRA or freezing recipe, optimizer and schedule, and the auxiliary loss's optimizer and hook."""
    d = distributed.setup(config.device)
    if auxiliary is not None and d.world > 1:
        raise ValueError("an auxiliary loss trains in one process only: its parameters are outside DDP/FSDP")
    out = Path(config.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(out)
    resume_from = checkpoint.latest(out) if config.resume else None
    state = checkpoint.load_state(resume_from) if resume_from is not None else None
    torch.manual_seed(config.seed)
    model, processor = _load_model(config, resume_from, state, d.device)
    wrapped = distributed.wrap(model, d, config.fsdp)
    opt = optimizer(wrapped, config.lr, config.weight_decay, config.lr_scale)
    sched = schedule(opt, config.warmup_steps, config.steps, config.min_lr_ratio)
    run = Run(config, d, out, model, wrapped, processor, opt, sched)
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        run.step = state["step"]
    _attach_auxiliary(run, auxiliary, state)
    return run


def _load_model(config: TrainConfig, resume_from: Path | None, state: dict | None,
                device: torch.device) -> tuple[PaliGemma, Processor]:
    """The model to train, in training mode with LoRA adapters or the freezing recipe applied, and its processor."""
    model = PaliGemma.from_pretrained(resume_from or config.model, device=device)
    processor = Processor.from_pretrained(resume_from or config.model)
    if state is not None and (config.lora_rank or state["config"].get("lora_rank")):
        lora.check_resume_options(state["config"], asdict(config))
        lora.restore_base_weights(model, config.model, config.lora_targets)  # the checkpoint holds merged weights
    if config.lora_rank:
        lora.apply(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets, config.recipe)
        if state is not None:
            lora.load_adapter(model, state["lora"])
    else:
        apply_recipe(model, config.recipe)
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


def _write_model(state: dict, model_config, processor: Processor):
    """A function writing config.json, the weights and the processor files into a directory."""
    def write(path: Path) -> None:
        model_config.save_pretrained(path)
        save_state_dict(state, path)
        processor.save_pretrained(path)
    return write
