"""The feed-forward blocks: Gemma's GeGLU and SigLIP's two-layer MLP, both with the tanh-approximated gelu.

Parameter names are the Hugging Face keys (`gate_proj`/`up_proj`/`down_proj`, `fc1`/`fc2`). The decoder
picks its MLP class from the config (models/gemma.py), so other feed-forward kinds plug in here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GeGLU(nn.Module):
    """down(gelu(gate(x)) · up(x)), bias-free (Gemma)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """fc2(gelu(fc1(x))), with biases (SigLIP)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))
