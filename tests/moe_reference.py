"""Tiny transformers PaliGemmas whose Gemma layers' `mlp` is a transformers MoE block: the MoE reference.

transformers has no mixture-of-experts PaliGemma, so the tests build one: a tiny random PaliGemma
(hf_reference.py), each sparse layer's `mlp` replaced by `MixtralSparseMoeBlock` (experts_implementation
"eager", gelu-tanh experts) or `Qwen2MoeSparseMoeBlock` (with its shared expert), every parameter redrawn.
save_pretrained writes the fused expert tensors under the layer's `mlp`; config.json gets the MoE fields
nanopali reads. Hooks on the routers record their logits, for transformers' load_balancing_loss_func.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_reference import hf_config, hf_model
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

# name: (PaliGemma generation, nanopali text_config MoE fields)
CASES = {
    "mixtral-pg2": (2, dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)),
    "qwen2moe-pg1": (1, dict(num_local_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
                             shared_expert_intermediate_size=40, moe_layers=[0, 2])),
}


def moe_block(kind: str, hidden: int, moe: dict) -> torch.nn.Module:
    common = dict(hidden_size=hidden, num_experts_per_tok=moe["num_experts_per_tok"], hidden_act="gelu_pytorch_tanh")
    if kind.startswith("mixtral"):
        config = MixtralConfig(num_local_experts=moe["num_local_experts"],
                               intermediate_size=moe["moe_intermediate_size"], router_jitter_noise=0.0, **common)
        block = MixtralSparseMoeBlock
    else:
        config = Qwen2MoeConfig(num_experts=moe["num_local_experts"],
                                moe_intermediate_size=moe["moe_intermediate_size"],
                                shared_expert_intermediate_size=moe["shared_expert_intermediate_size"],
                                norm_topk_prob=moe["norm_topk_prob"], **common)
        block = Qwen2MoeSparseMoeBlock
    config._experts_implementation = "eager"
    return block(config)


def hf_moe_model(kind: str, seed: int = 0, std: float = 0.2, embed_scale: float = 1.0, eos_boost: float = 1.0):
    """(transformers model, its HF config, nanopali MoE fields) of case `kind`, every parameter ~ N(0, std);
    embed_scale < 1 and eos_boost > 1 make greedy outputs varied and sometimes end (hf_generation_model)."""
    generation, moe = CASES[kind]
    cfg = hf_config(generation, 2)
    model = hf_model(cfg, seed, std)
    layers = model.model.language_model.layers
    sparse = moe.get("moe_layers", range(len(layers)))
    torch.manual_seed(seed + 1)
    for i in sparse:
        layers[i].mlp = moe_block(kind, cfg.text_config.hidden_size, moe)
        with torch.no_grad():
            for p in layers[i].mlp.parameters():
                p.normal_(0.0, std)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.mul_(embed_scale)
        embed[1] *= eos_boost
    return model.eval(), cfg, moe


def save(model, moe: dict, path: Path) -> Path:
    """save_pretrained, then the MoE fields into text_config (transformers' PaliGemma config has none)."""
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(moe)
    (path / "config.json").write_text(json.dumps(config))
    return path


def record_router_logits(model) -> list[torch.Tensor]:
    """A list that fills with each MoE router's logits (N, E) on every forward, layer by layer."""
    found: list[torch.Tensor] = []
    for layer in model.model.language_model.layers:
        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"):
            layer.mlp.gate.register_forward_hook(lambda m, args, out: found.append(out[0]))
    return found
