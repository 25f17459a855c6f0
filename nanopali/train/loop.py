"""The training loop: fine-tune (or train) PaliGemma on prefix/suffix examples, top to bottom.

    config = TrainConfig(model="ckpt", data="train.jsonl", out="runs/x", recipe="attention-only", steps=500)
    fit(config)                          # or fit(config, train_data=[{"image": ..., "prefix": ..., "suffix": ...}, ...])

One step = grad_accum micro-batches of batch_size examples on each of the world-size processes;
the loss of the step is the mean over the suffix tokens of the whole global batch (or over its
examples), whatever the split. Checkpoints (checkpoint.py) are written every save_every steps,
at the end, and when SIGTERM/SIGINT arrives; `resume=True` continues from the newest one exactly.
With lora_rank > 0 only LoRA adapters on the decoder train (lora.py) and checkpoints hold the merged model.

`fit(..., auxiliary=module)` adds an auxiliary loss on the vision tower's output tokens:
`module(features (B, P, D), examples) -> scalar`, e.g. patch_warmup.PatchLoss on per-patch labels the
examples carry. Its parameters have their own AdamW on the same schedule, without weight decay, at lr
times the lr_scale matching "auxiliary.<name>"; they live in the trainer state (not in the model's
weights), so a resumed run continues them. It runs in one process only.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ..loss import count
from ..model import PaliGemma
from ..processor import Processor
from ..weights import save_state_dict
from . import checkpoint, distributed, lora
from .data import JsonlDataset, as_example, collate, example_stream
from .evaluate import evaluate
from .recipes import apply_recipe, optimizer, schedule


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
        values = json.loads(Path(path).read_text())
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training options {sorted(unknown)}")
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


def _model_state(model, config: TrainConfig) -> tuple[dict, dict | None]:
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

    model = PaliGemma.from_pretrained(resume_from or config.model, device=d.device)
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
    wrapped = distributed.wrap(model, d, config.fsdp)
    opt = optimizer(wrapped, config.lr, config.weight_decay, config.lr_scale)
    sched = schedule(opt, config.warmup_steps, config.steps, config.min_lr_ratio)
    step = 0
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step = state["step"]
    aux_opt, aux_sched, captured = _auxiliary(auxiliary, model, config, d.device, state)

    train = train_data if train_data is not None else JsonlDataset(config.data, config.skip_bad) if config.data else None
    if train is None:
        raise ValueError("no training data: set data= (a JSONL file) or pass train_data=")
    held_out = eval_data if eval_data is not None else JsonlDataset(config.eval, config.skip_bad) if config.eval else None
    held_out = [as_example(e, f"eval example {i}") for i, e in enumerate(held_out)] if held_out is not None else None
    per_step = config.batch_size * d.world * config.grad_accum
    stream = example_stream(train, config.seed, start=step * per_step)
    metrics = out / "metrics.jsonl"
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()

    def save(at: int) -> Path:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        opt_state = get_optimizer_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights, adapter = _model_state(wrapped, config)
        path = out / f"{checkpoint.PREFIX}{at:06d}"
        if d.main:
            trainer_state = {"step": at, "optimizer": opt_state, "scheduler": sched.state_dict(), "rng": checkpoint.rng_state(),
                             "data_position": at * per_step, "config": asdict(config)}
            if adapter is not None:
                trainer_state["lora"] = adapter
            if auxiliary is not None:
                trainer_state["auxiliary"] = {"module": auxiliary.state_dict(), "optimizer": aux_opt.state_dict(),
                                              "scheduler": aux_sched.state_dict()}
            write = _write_model(weights, distributed.unwrap(wrapped).config, processor)
            path = checkpoint.save(out, at, write, trainer_state, config.keep_checkpoints)
        d.barrier()
        return path

    def log(record: dict) -> None:
        if d.main:
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")

    bar = tqdm(total=config.steps, initial=step, disable=not d.main, desc="train", dynamic_ncols=True)
    # No host-device sync between log steps (losses and norms stay tensors until then, counts come from the CPU
    # batch, pinned copies): on a GPU the next batch is prepared while the last step's kernels still run.
    since = {"time": time.perf_counter(), "steps": 0, "tokens": 0}
    with _StopSignal() as stop:
        while step < config.steps and not stop.requested:
            micro, micro_examples, counts = [], [], []
            for _ in range(config.grad_accum):
                examples = [next(stream) for _ in range(config.batch_size * d.world)]
                mine = examples[d.rank * config.batch_size:(d.rank + 1) * config.batch_size]
                batch = collate(processor, mine, config.max_length)
                counts.append(count(batch["labels"], config.loss_reduction))
                since["tokens"] += int(batch["attention_mask"].sum())
                micro.append(_to_device(batch, d.device))
                micro_examples.append(mine)
            # divide by the count over the global batch, times world size (DDP/FSDP average the ranks)
            total = d.sum(sum(counts))
            step_loss = aux_loss = 0.0
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1 or not hasattr(wrapped, "no_sync")
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast:
                    lm_loss = wrapped(**batch, reduction=config.loss_reduction, label_smoothing=config.label_smoothing,
                                      denominator=max(total, 1) / d.world).loss
                    loss = lm_loss
                    if auxiliary is not None:  # on the features this forward just made: (B, P, D)
                        aux = auxiliary(captured.pop(), micro_examples[i]) / len(micro)
                        captured.clear()  # what evaluation's forwards added
                        aux_loss = aux_loss + aux.detach()
                        loss = lm_loss + aux
                loss.backward()
                step_loss = step_loss + lm_loss.detach() / d.world
            trained = [p for p in wrapped.parameters() if p.requires_grad] + list(auxiliary.parameters() if auxiliary else [])
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm) if config.max_grad_norm else None
            lr = sched.get_last_lr()[0]
            for o, s in ((opt, sched), (aux_opt, aux_sched)):
                if o is not None:
                    o.step()
                    s.step()
                    o.zero_grad(set_to_none=True)
            step += 1
            since["steps"] += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                step_loss = d.sum(float(step_loss))
                seconds, tokens = time.perf_counter() - since["time"], d.sum(since["tokens"])
                log({"step": step, "loss": step_loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                     "examples_per_s": per_step * since["steps"] / seconds, "tokens_per_s": tokens / seconds,
                     **({"aux_loss": float(aux_loss)} if auxiliary is not None else {})})
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{per_step * since['steps'] / seconds:.1f}")
                since = {"time": time.perf_counter(), "steps": 0, "tokens": 0}
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save(step)
            if held_out and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                log({"step": step, **_evaluate(wrapped, processor, held_out, config, d)})
    bar.close()
    final = save(step)
    if held_out and not stop.requested:
        log({"step": step, **_evaluate(wrapped, processor, held_out, config, d)})
    if d.main and metrics.is_file():
        _plot(metrics, out / "loss.png")
    distributed.teardown()
    return final


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A CPU batch on `device`; to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _auxiliary(auxiliary, model, config: TrainConfig, device, state):
    """The auxiliary loss's optimizer and schedule (restored from a resumed run's state), and the list a
    forward hook on the vision tower appends its output to; all None without an auxiliary loss."""
    saved = state.get("auxiliary") if state is not None else None
    if state is not None and (saved is None) != (auxiliary is None):
        raise ValueError("cannot resume: the run was started " + ("without" if saved is None else "with")
                         + " an auxiliary loss and this call passes " + ("one" if saved is None else "none"))
    if auxiliary is None:
        return None, None, None
    auxiliary.to(device).train()
    opt = optimizer(torch.nn.ModuleDict({"auxiliary": auxiliary}), config.lr, 0.0, config.lr_scale)  # "auxiliary.*"
    sched = schedule(opt, config.warmup_steps, config.steps, config.min_lr_ratio)
    if saved is not None:
        auxiliary.load_state_dict(saved["module"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
    captured = []
    model.vision.register_forward_hook(lambda module, args, output: captured.append(output))
    return opt, sched, captured


def _evaluate(model, processor, examples, config: TrainConfig, d: distributed.Dist) -> dict:
    """Evaluate on rank 0 (other ranks wait), or on every rank under FSDP, whose layers need all ranks."""
    result = {}
    if d.main or config.fsdp:
        with distributed.root_unsharded(model):
            result = {f"eval/{k}": v for k, v in evaluate(distributed.unwrap(model), processor, examples,
                                                          config.batch_size, config.eval_max_new_tokens).items()}
    d.barrier()
    return result
