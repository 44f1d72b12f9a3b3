"""Feed-forward layers for DiT blocks, selected by name (the seam that mixture-of-experts plugs into).

A block builds its MLP with `build_mlp(name, dim, hidden_dim, **kwargs)`; every variant maps (N, T, D) -> (N, T, D).
"""
import torch.nn as nn

MLP = {}


def register_mlp(name):
    """Class decorator: make an MLP class available to DiT configs under `name`."""
    def wrap(cls):
        if name in MLP:
            raise ValueError(f"mlp {name!r} is already registered")
        MLP[name] = cls
        return cls
    return wrap


def build_mlp(name, dim, hidden_dim, **kwargs):
    if name not in MLP:
        raise ValueError(f"unknown mlp {name!r}; registered: {', '.join(sorted(MLP))}")
    return MLP[name](dim, hidden_dim, **kwargs)


@register_mlp("mlp")
class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear: the DiT feed-forward (tanh GELU, as the official weights were trained)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
