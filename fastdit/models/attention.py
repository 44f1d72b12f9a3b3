"""Self-attention layers for DiT blocks, selected by name.

A block builds its attention with `build_attention(name, dim, num_heads, **kwargs)`, so an attention variant is
added by registering a class here, never by copying the block. Every variant maps (N, T, D) -> (N, T, D).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry

ATTENTION = Registry("attention")
build_attention = ATTENTION.build        # build_attention(name, dim, num_heads, **kwargs)


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make an attention available to DiT configs by name."""
    return ATTENTION.register(name)


@register_attention("mha")
class Attention(nn.Module):
    """Standard multi-head self-attention with one fused qkv projection, through fused SDPA.

    By default the heads fill the width (head_dim = dim / num_heads). With `head_dim` they need not: qkv maps
    D -> 3 * H * hd and proj H * hd -> D, which is what a block keeps after head pruning removes some of its heads."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, head_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
            head_dim = dim // num_heads
        elif num_heads < 1 or head_dim < 1:
            raise ValueError(f"an attention layer needs at least one head of width >= 1, got {num_heads} heads of "
                             f"{head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        # qkv rows are laid out [q; k; v], each split into heads of head_dim consecutive rows: the official
        # checkpoint layout, which head pruning and GQA conversion index into.
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # 3 x (N, H, T, hd)
        x = F.scaled_dot_product_attention(q, k, v)                         # (N, H, T, hd), scale hd^-1/2
        x = x.transpose(1, 2).reshape(N, T, self.num_heads * self.head_dim)  # (N, T, H * hd), = D unless pruned
        return self.proj(x)
