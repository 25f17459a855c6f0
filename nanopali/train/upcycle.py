"""Sparse upcycling (Komatsuzaki et al., 2022): a dense PaliGemma becomes a mixture-of-experts one to train further.

    moe = upcycle(PaliGemma.from_pretrained("dense"), num_experts=8, top_k=2)     # nanopali upcycle DIR OUT ...

Every sparse layer's experts start as copies of that layer's dense GeGLU (gate and up rows fused as
[gate; up], as nn/moe.Experts stores them) and its router as N(0, router_std) weights, small so that routing
starts close to uniform. With identical experts and renormalized top-k weights (norm_topk_prob, required
here) each token's output is its dense output, so the upcycled model computes the dense model's logits
exactly, up to rounding; the experts only drift apart once training sends them different tokens. Every other
parameter is the dense model's own.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from nanopali.errors import UsageError
from nanopali.models.paligemma import PaliGemma


def upcycle(dense: PaliGemma, num_experts: int, top_k: int, jitter_noise: float = 0.0, router_std: float = 0.01,
            aux_loss_coef: float = 0.01, seed: int = 0) -> PaliGemma:
    """A new PaliGemma whose every decoder layer is sparse (num_experts copies of its MLP, top_k per token)."""
    text = dense.config.text_config
    if text.num_local_experts:
        raise UsageError(f"the model already has a mixture-of-experts decoder ({text.num_local_experts} experts); "
                         "upcycling starts from a dense one")
    if not 1 <= top_k <= num_experts:
        raise UsageError(f"--top-k {top_k} must be between 1 and --experts {num_experts}")
    if not (router_std > 0 and router_std == router_std):
        raise UsageError(f"--router-std must be a number > 0, got {router_std}")
    config = replace(dense.config, text_config=replace(
        text, num_local_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        router_jitter_noise=jitter_noise, router_aux_loss_coef=aux_loss_coef))  # TextConfig checks the values
    state = dense.state_dict()
    dtype = state["language_model.model.norm.weight"].dtype
    generator = torch.Generator().manual_seed(seed)
    for i in range(text.num_hidden_layers):
        prefix = f"language_model.model.layers.{i}.mlp."
        gate, up, down = (state.pop(prefix + f"{name}.weight") for name in ("gate_proj", "up_proj", "down_proj"))
        state[prefix + "experts.gate_up_proj"] = torch.cat([gate, up]).expand(num_experts, -1, -1).clone()  # (E, 2I, D)
        state[prefix + "experts.down_proj"] = down.expand(num_experts, -1, -1).clone()                    # (E, D, I)
        router = torch.randn(num_experts, text.hidden_size, generator=generator) * router_std
        state[prefix + "gate.weight"] = router.to(dtype=dtype, device=gate.device)
    with torch.device("meta"):
        model = PaliGemma(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model
