"""Feed-forward layers for DiT blocks, selected by name (the seam that mixture-of-experts plugs into).

A block builds its MLP with `build_mlp(name, dim, hidden_dim, **kwargs)`; every variant maps (N, T, D) -> (N, T, D).
"""
import torch.nn as nn

from ..registry import Registry

MLP = Registry("mlp")
register_mlp = MLP.register  # class decorator: make an MLP available to DiT configs by name
build_mlp = MLP.build        # build_mlp(name, dim, hidden_dim, **kwargs)


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
