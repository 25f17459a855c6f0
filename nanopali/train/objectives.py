"""What a training run optimizes, and everything that depends on it: the model and processor it loads, the JSONL
fields of its examples, how a batch is made and what its loss is, held-out evaluation, the freezing recipes.

    "suffix"  PaliGemma: next-token cross-entropy on the suffix (nn/losses.py); examples image/prefix/suffix
    "siglip"  a contrastive SigLIP with the sigmoid loss; examples image/text
    "clip"    the same model with CLIP's softmax loss (the saved config says "clip": its probabilities are a softmax)

The loop (loop.py) and the run state (run_state.py) only talk to an Objective. Under torchrun the contrastive
losses span the global batch (train/losses.py: text chunks around a ring for SigLIP, gathered features for CLIP),
computed inside the model's forward so DDP and FSDP2 see every parameter used there. A contrastive batch is one
global batch: the negatives of an example are the other examples of its step, so gradient accumulation, which
would split them into micro-batches, is refused.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from nanopali.errors import UsageError
from nanopali.inputs.processor import Processor
from nanopali.inputs.siglip_processor import SigLIPProcessor
from nanopali.models.contrastive import SigLIP
from nanopali.models.paligemma import PaliGemma
from nanopali.nn.losses import count as suffix_count
from nanopali.train.data import FIELDS, PAIR_FIELDS, JsonlDataset, collate, collate_pairs
from nanopali.train.evaluate import evaluate, evaluate_contrastive
from nanopali.train.losses import contrastive_loss
from nanopali.train.recipes import CONTRASTIVE_RECIPES, RECIPES

OBJECTIVES = ("suffix", "siglip", "clip")


class Suffix:
    """PaliGemma's prefix-LM fine-tuning (and training from scratch)."""

    name, fields = "suffix", FIELDS
    recipes = RECIPES

    def processor(self, path: Path):
        return Processor.from_pretrained(path)

    def model(self, path: Path, device: torch.device):
        return PaliGemma.from_pretrained(path, device=device)

    def dataset(self, path, config, processor, held_out: bool = False) -> JsonlDataset:
        return JsonlDataset(path, config.skip_bad, processor, None if held_out else config.max_length, self.fields)

    def batch(self, processor, items, config) -> tuple[dict, int, int]:
        """(tensors, loss divisor of this micro-batch, tokens in it)."""
        batch = collate(processor, items, config.max_length)
        return batch, suffix_count(batch["labels"], config.loss_reduction), int(batch["attention_mask"].sum())

    def forward(self, wrapped, batch, config, denominator: float, **router):
        """The model's output; its `.loss` includes a mixture-of-experts decoder's router losses, computed over the
        global micro-batch with `router` (router_reduce, router_scale: models/paligemma.py)."""
        return wrapped(**batch, reduction=config.loss_reduction, label_smoothing=config.label_smoothing,
                       denominator=denominator, **router)

    def evaluate(self, model, processor, items, config) -> dict:
        return evaluate(model, processor, items, config.batch_size, config.eval_max_new_tokens)

    def layers(self, model) -> list[torch.nn.Module]:
        """The blocks FSDP2 shards one by one."""
        return list(model.vision.encoder.layers) + list(model.decoder.layers)


class Contrastive:
    """A SigLIP model trained with the sigmoid ("siglip") or softmax ("clip") contrastive loss."""

    fields = PAIR_FIELDS
    recipes = CONTRASTIVE_RECIPES

    def __init__(self, name: str):
        self.name = name

    def processor(self, path: Path):
        return SigLIPProcessor.from_pretrained(path)

    def model(self, path: Path, device: torch.device):
        model = SigLIP.from_pretrained(path, device=device)
        model.config = replace(model.config, objective=self.name)  # what the saved checkpoints' logits mean
        return model

    def dataset(self, path, config, processor, held_out: bool = False) -> JsonlDataset:
        return JsonlDataset(path, config.skip_bad, processor, None, self.fields)

    def batch(self, processor, items, config) -> tuple[dict, int, int]:
        batch = collate_pairs(processor, items)
        return batch, len(items), int(batch["input_ids"].numel())

    def forward(self, wrapped, batch, config, denominator: float, **router):
        """The model's output, whose `.loss` is this process's share of the global batch's loss (train/losses.py);
        `denominator` and `router` are the suffix objective's (a SigLIP has no experts)."""
        return wrapped(**batch, return_loss=True, loss_fn=partial(contrastive_loss, self.name))

    def evaluate(self, model, processor, items, config) -> dict:
        return evaluate_contrastive(model, processor, items, config.batch_size)

    def layers(self, model) -> list[torch.nn.Module]:
        return list(model.vision_model.encoder.layers) + list(model.text_model.encoder.layers)


def objective(name: str) -> Suffix | Contrastive:
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
    return Suffix() if name == "suffix" else Contrastive(name)


def check_options(config) -> None:
    """The recipe is one of the objective's, and the options it cannot take are not given: a UsageError naming the
    option and why."""
    recipes = objective(config.objective).recipes
    if config.recipe not in recipes:
        raise UsageError(f"training option recipe (--recipe) must be one of {', '.join(recipes)} for --objective "
                         f"{config.objective}, got {config.recipe!r}")
    if config.objective == "suffix":
        return
    if config.grad_accum != 1:
        raise UsageError(f"--grad-accum {config.grad_accum} with --objective {config.objective}: a contrastive loss "
                         "compares each example with the others of its batch, so accumulating micro-batches would "
                         "change the loss; use a larger --batch-size (or more processes) instead")
    if config.lora_rank:
        raise UsageError(f"--lora-rank with --objective {config.objective}: LoRA adapts PaliGemma's decoder; a "
                         "contrastive SigLIP trains in full or with --recipe freeze-vision / freeze-text")
    for name, default in (("loss_reduction", "token"), ("label_smoothing", 0.0), ("max_length", None)):
        if getattr(config, name) != default:
            raise UsageError(f"--{name.replace('_', '-')} applies to --objective suffix (PaliGemma's suffix loss), "
                             f"not to {config.objective}")
