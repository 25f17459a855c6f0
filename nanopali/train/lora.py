"""LoRA on the Gemma decoder's linear layers through the `peft` library, merged back for checkpoints.

    trainable = apply(model, rank=8, alpha=16)   # adapters on every decoder layer's q/k/v/o, gate/up/down
    merged, adapter = merge(model_state, 16 / 8) # peft-named state -> Hugging Face layout + adapter tensors

peft's `inject_adapter_in_model` works on any nn.Module, ours included: each targeted nn.Linear
becomes a peft `lora.Linear` that keeps the original layer as `base_layer` and adds `lora_A`
(r, in) and `lora_B` (out, r), so y = W x + (alpha / r) B A x, with B starting at zero. Only the
decoder is targeted (SigLIP has q/k/v projections too; they are left alone).

What trains. The base model is frozen and the adapters train. `recipe` names base parameters that
train in full besides them, e.g. "projector-only" = adapters + projector; wrapped weights always
stay frozen. "full" would train the whole base model, which defeats LoRA, so with LoRA it means
"the adapters alone".

Checkpoints. Parameter names gain `.base_layer` and `.lora_A.default`, so the loop writes merged
weights, W + (alpha / r) B A under the original names: PaliGemma.from_pretrained and transformers
load them like any checkpoint. The adapter tensors go into trainer_state.pt. A resumed run takes
the wrapped base weights from the base checkpoint again (a merged weight minus the delta is not
bitwise the original) and the adapters from trainer_state.pt, so it continues exactly.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors import safe_open

from nanopali.errors import UsageError
from nanopali.io.hf_checkpoint import canonical_key, checkpoint_files
from nanopali.train.recipes import RECIPES

TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ADAPTER = "default"  # peft's adapter name; it appears in the parameter names
_A, _B, _BASE = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight", ".base_layer.weight"
OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")  # TrainConfig fields a resume must repeat


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA training needs the peft library: pip install nanopali[lora]  (or: pip install peft)") from e
    return peft


def target_pattern(targets) -> str:
    """A regex over full module names matching the targeted linear layers of the decoder only."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise UsageError(f"unknown LoRA targets {unknown or list(targets)}; choose among {', '.join(TARGETS)}")
    alternatives = "|".join(f"{TARGETS[t]}\\.{t}" for t in sorted(set(targets)))
    return rf"language_model\.model\.layers\.\d+\.({alternatives})"


def wrapped_weights(names, targets) -> list[str]:
    """The Hugging Face names of the base weights that LoRA wraps (and freezes)."""
    pattern = re.compile(target_pattern(targets) + r"\.weight")
    return [n for n in names if pattern.fullmatch(n)]


def apply(model: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=tuple(TARGETS),
          recipe: str = "full") -> list[str]:
    """Add LoRA adapters in place, freeze the base model except the recipe's unwrapped parameters.

    Returns the names of the trainable parameters.
    """
    if rank < 1:
        raise UsageError(f"lora_rank must be >= 1 to use LoRA, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"lora_dropout must be in [0, 1), got {dropout}")
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    peft = _peft()
    full = () if recipe == "full" else RECIPES[recipe]  # "full" + LoRA = adapters alone (see the docstring)
    also = {id(p) for n, p in model.named_parameters() if any(fnmatchcase(n, pattern) for pattern in full)}
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern(targets),
                             bias="none", use_rslora=False)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    trainable = []
    for name, p in model.named_parameters():
        adapter = ".lora_" in name
        p.requires_grad_(adapter or (id(p) in also and not name.endswith(_BASE)))
        if p.requires_grad:
            trainable.append(name)
    if not any(".lora_" in n for n in trainable):
        raise RuntimeError("peft added no LoRA adapter: no decoder layer matched the targets")
    return trainable


def merge(state: dict[str, torch.Tensor], scaling: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a LoRA model's state dict into merged Hugging Face-layout weights and the adapter tensors.

    Each wrapped `X.base_layer.weight` W becomes `X.weight` = W + scaling * B A (computed in fp32,
    stored in W's dtype); the `lora_A` / `lora_B` tensors are returned separately, under their names.
    """
    merged, adapter = {}, {}
    for name, tensor in state.items():
        if name.endswith(_A) or name.endswith(_B):
            adapter[name] = tensor
        elif name.endswith(_BASE):
            module = name[:-len(_BASE)]
            a, b = state[module + _A], state[module + _B]                      # (r, in), (out, r)
            delta = (b.float() @ a.float()) * scaling                          # (out, in)
            merged[module + ".weight"] = (tensor.float() + delta).to(tensor.dtype)
        elif ".lora_" in name:
            raise ValueError(f"cannot merge {name}: only lora_A / lora_B of linear layers are supported")
        else:
            merged[name] = tensor
    return merged, adapter


def load_adapter(model: torch.nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into a model that apply() prepared with the same options."""
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    if set(params) != set(adapter):
        missing, extra = sorted(set(params) - set(adapter)), sorted(set(adapter) - set(params))
        raise ValueError(f"the saved LoRA adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != adapter[name].shape:
                raise ValueError(f"saved LoRA tensor {name} has shape {tuple(adapter[name].shape)}, "
                                 f"the model's is {tuple(p.shape)} (was lora_rank changed?)")
            p.copy_(adapter[name])


def restore_base_weights(model: torch.nn.Module, base: str | Path, targets) -> None:
    """Before apply(): put back the base checkpoint's values of the weights LoRA wraps.

    A resumed LoRA run loads the newest (merged) checkpoint; its wrapped weights include the
    adapters' delta, which the restored adapters would add a second time.
    """
    names = set(wrapped_weights(dict(model.named_parameters()), targets))
    found = {}
    for file in checkpoint_files(Path(base)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if canonical_key(key) in names:
                    found[canonical_key(key)] = f.get_tensor(key)
    if set(found) != names:
        raise ValueError(f"base checkpoint {base} lacks {sorted(names - set(found))[:3]}: resume a LoRA run "
                         f"with model= set to the checkpoint it started from")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in found.items():
            params[name].copy_(tensor)


def check_resume_options(saved: dict, current: dict) -> None:
    """A LoRA run resumes only with the LoRA options and the base model it was started with.

    `saved` and `current` are TrainConfig fields as dicts (the saved one from trainer_state.pt).
    """
    def normal(config: dict, key: str):
        value = config.get(key)
        if key == "lora_targets":
            return sorted(value or ())
        return str(Path(value).resolve()) if key == "model" else value
    changed = [k for k in (*OPTIONS, "model") if normal(saved, k) != normal(current, k)]
    if changed:
        raise UsageError("cannot resume this LoRA run with different options (saved -> now): "
                         + ", ".join(f"{k}={saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
                         + "; LoRA checkpoints are merged, so resuming needs the same base model and adapters")
