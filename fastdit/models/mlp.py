"""Feed-forward layers for DiT blocks, selected by name (the seam that mixture-of-experts plugs into).

A block builds its MLP with `build_mlp(name, dim, hidden_dim, **kwargs)`; every variant maps (N, T, D) -> (N, T, D).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..registry import Registry

MLP = Registry("mlp")
build_mlp = MLP.build        # build_mlp(name, dim, hidden_dim, **kwargs)


def register_mlp(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make an MLP available to DiT configs by name."""
    return MLP.register(name)


@register_mlp("mlp")
class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear: the DiT feed-forward (tanh GELU, as the official weights were trained)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
