"""The sparse mixture-of-experts MLP: a router picks k of E GeGLU experts per token (Mixtral, Qwen2-MoE).

    moe = SparseMoE(hidden_size=D, intermediate_size=I, num_experts=E, top_k=k)
    y = moe(x)                         # (B, T, D) -> (B, T, D); moe.router_logits (B·T, E) for the losses

Routing follows transformers' MixtralTopKRouter: logits = gate(x), softmax in fp32, top-k, the k weights
renormalized to sum 1 (`norm_topk_prob`; Qwen2-MoE leaves them unnormalized). Two optional training-only
noises: Mixtral's jitter (the layer input times U(1 - j, 1 + j)) and the noisy top-k router of "seemore"
(logits + N(0, 1)·softplus(W_noise x), W_noise = `noise.weight`, a parameter transformers does not have).
Qwen2-MoE's shared expert adds sigmoid(shared_expert_gate(x))·shared_expert(x) for every token.

Parameters are transformers 5.x's fused layout, so checkpoints load with the same strict plumbing:
`gate.weight` (E, D), `experts.gate_up_proj` (E, 2I, D) = [gate; up] rows, `experts.down_proj` (E, D, I).
Dispatch is dropless and has no per-token loop: the (token, expert) pairs are sorted by expert, each expert
runs once on its contiguous slice (in bf16 one torch._grouped_mm runs all of them, on the CPU and on CUDA GPUs
of compute capability >= 8.0), and the k weighted outputs of each token are summed in fp32. Every expert's
weights are one tensor, so an expert that gets no token still gets a (zero) gradient: DDP sees no unused
parameter.

`router_logits` holds the logits the last forward routed with (noise included), for the training losses
(nn/losses.router_losses); models/paligemma.py collects them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopali.nn.mlp import GeGLU, gelu_tanh

# expert_fn(e, x_e (n, D)) -> (n, D): expert e on its n rows; how the products are computed is the caller's
ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (fp32 weights (N, k), long expert ids (N, k)): softmax, top-k, renormalized."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def dispatch(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, num_experts: int,
             expert_fn: ExpertFn | None = None, grouped=None) -> torch.Tensor:
    """Σ_j weights[n, j] · expert_{experts[n, j]}(x[n]) for every row n of x (N, D), dropless.

    The N·k (row, expert) pairs are sorted by expert; then either `expert_fn(e, rows)` runs once per expert that
    has rows, on its contiguous slice (the slice sizes come to the host), or `grouped(rows (S, D), offsets int32
    (E,))` runs all of them at once with no host sync (a decode step can then be captured in a CUDA graph).
    Each output is weighted in fp32 and rounded to x's dtype (as transformers), and a row's k outputs are added
    in fp32 in a fixed order (no atomics: deterministic on GPUs too)."""
    N, k = experts.shape
    flat = experts.reshape(-1)                                                    # (N·k,)
    order = flat.argsort(stable=True)                                             # pairs, by expert
    rows = x[order // k]                                                          # (N·k, D)
    counts = torch.zeros(num_experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    if grouped is not None:
        out = grouped(rows, counts.cumsum(0, dtype=torch.int32))
    else:
        sizes = counts.tolist()
        out = torch.cat([expert_fn(e, part) for e, part in enumerate(rows.split(sizes)) if sizes[e]])
    out = (out * weights.reshape(-1)[order, None]).to(x.dtype)                   # (N·k, D), weighted
    unsorted = torch.empty_like(out).index_copy_(0, order, out)                   # back to (row, slot) order
    return unsorted.view(N, k, -1).sum(1, dtype=torch.float32).to(x.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' products run in: autocast's, when it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes the products for activations x: in bf16 (x's dtype or autocast's; fp32
    weights are then cast, as autocast casts F.linear's) on the CPU or on a CUDA GPU of compute capability >= 8.0.
    There it is faster than a loop over the experts, forward + backward (BENCHMARKS.md); fp32 takes the loop."""
    if compute_dtype(x) != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return x.device.type == "cpu" or x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_experts(rows: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """Every GeGLU expert at once, in bf16: rows (S, D) sorted by expert, int32 offsets (E,), gate_up (E, 2I, D)
    and down (E, D, I) -> bf16 (S, D): two torch._grouped_mm calls (which autocast does not cast)."""
    rows = rows.to(torch.bfloat16)
    gate_up, down = (w.to(torch.bfloat16).transpose(1, 2) for w in (gate_up, down))
    return torch._grouped_mm(_geglu(torch._grouped_mm(rows, gate_up, offs=offsets)), down, offs=offsets)


class Experts(nn.Module):
    """E GeGLU experts as two fused tensors: gate_up_proj (E, 2I, D) and down_proj (E, D, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), expert ids (N, k), fp32 weights (N, k) -> (N, D)."""
        if grouped_mm_available(x):
            return dispatch(x, experts, weights, self.num_experts, grouped=self._grouped)
        # unbind once: its backward stacks the experts' gradients into one tensor, where indexing the
        # parameter per expert would allocate a full-size zero gradient for each expert
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        return dispatch(x, experts, weights, self.num_experts,
                        lambda e, rows: F.linear(_geglu(F.linear(rows, gate_up[e])), down[e]))

    def _grouped(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_experts(rows, offsets, self.gate_up_proj, self.down_proj)

    def extra_repr(self) -> str:
        E, two_i, D = self.gate_up_proj.shape
        return f"num_experts={E}, hidden_size={D}, intermediate_size={two_i // 2}"


def _geglu(h: torch.Tensor) -> torch.Tensor:
    """[gate | up] (..., 2I) -> gelu_tanh(gate)·up (..., I)."""
    gate, up = h.chunk(2, dim=-1)
    return gelu_tanh(gate) * up


class SparseMoE(nn.Module):
    """Router + experts (+ optional shared expert), a drop-in for the decoder layer's GeGLU `mlp`."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool = True, jitter_noise: float = 0.0, noisy_topk: bool = False,
                 shared_intermediate_size: int | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.jitter_noise = jitter_noise
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)                 # the router
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.noise = nn.Linear(hidden_size, num_experts, bias=False) if noisy_topk else None
        if shared_intermediate_size:
            self.shared_expert = GeGLU(hidden_size, shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                    # (N, D)
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = self.gate(x)                                                          # (N, E)
        if self.training and self.noise is not None:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        self.router_logits = logits
        weights, experts = route(logits, self.top_k, self.norm_topk_prob)              # (N, k) each
        y = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(shape)


def idle_expert_parameters(module: nn.Module) -> int:
    """Expert parameters under `module` that one token does not use: E - k of the E experts of every SparseMoE
    (total parameters minus this = the active parameters; on a meta-device model too)."""
    return sum((m.num_experts - m.top_k) * (m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel())
               for m in module.modules() if isinstance(m, SparseMoE))
