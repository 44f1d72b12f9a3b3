"""Self-attention layers for DiT blocks, selected by name.

A block builds its attention with `build_attention(name, dim, num_heads, **kwargs)`, so an attention variant is
added by registering a class here, never by copying the block. Every variant maps (N, T, D) -> (N, T, D).
"""
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Registry

ATTENTION = Registry("attention")
register_attention = ATTENTION.register  # class decorator: make an attention available to DiT configs by name
build_attention = ATTENTION.build        # build_attention(name, dim, num_heads, **kwargs)


@register_attention("mha")
class Attention(nn.Module):
    """Standard multi-head self-attention with one fused qkv projection, through fused SDPA."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # qkv rows are laid out [q; k; v], each split into heads of head_dim consecutive rows: the official
        # checkpoint layout, which head pruning and GQA conversion index into.
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # 3 x (N, H, T, hd)
        x = F.scaled_dot_product_attention(q, k, v)                         # (N, H, T, hd), scale hd^-1/2
        x = x.transpose(1, 2).reshape(N, T, D)                              # (N, T, D)
        return self.proj(x)
