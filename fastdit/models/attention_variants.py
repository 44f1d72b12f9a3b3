"""Simplified attention for DiT blocks, registered by name next to "mha" (fastdit.models.attention).

    create_model("DiT-S/2", attn="focused", attn_kwargs=dict(kv_heads=2))

Every variant maps (N, T, D) -> (N, T, D) like "mha", and keeps its fused projection named `qkv` with rows laid out
[q; k; v], each split into heads of head_dim consecutive rows, so mha weights carry over wherever the shapes allow.

    gqa       softmax attention with kv_heads key/value heads, each shared by num_heads / kv_heads query heads
              (multi-query at kv_heads=1, multi-head at kv_heads=num_heads; Ainslie et al. 2023, arXiv 2305.13245)
    mediated  M mediator tokens, average-pooled from the queries, gather the values (softmax over keys) and pass them
              on to the queries (softmax over mediators): O(T * M) instead of O(T^2); plus a depthwise 3x3 conv of V and
              optional learned position biases (Pu et al. 2024, arXiv 2408.05710, after Agent Attention)
    shallow   softmax attention with q, k, v projected to D / compression (head dim divided, same heads)
    focused   focused linear attention (Han et al. 2023, FLatten, arXiv 2308.00442): ReLU features sharpened by a power
              p with their norm kept, K^T V multiplied first (O(T)), normalized by q . sum(k), plus a depthwise 3x3
              conv of V; with multi-query / grouped-query key and value heads

The spatial variants (mediated pooling, depthwise convs, position biases) read the T tokens as a square grid in
row-major order, DiT's patch order; a non-square token count is an error.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import register_attention


def _grid(tokens):
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"{tokens} tokens are not a square grid; spatial attention variants need h == w patches")
    return g


def _heads_from_grid(x, heads, g):
    """(N, C, g, g) -> (N, heads, g*g, C/heads): channels split into heads of consecutive channels."""
    N, C = x.shape[:2]
    return x.reshape(N, heads, C // heads, g * g).transpose(-1, -2)


def _grid_from_heads(x, g):
    """(N, heads, g*g, d) -> (N, heads*d, g, g): the inverse of _heads_from_grid."""
    N, H, T, d = x.shape
    return x.transpose(-1, -2).reshape(N, H * d, g, g)


def _split_heads(x, heads):
    """(N, T, heads*d) -> (N, heads, T, d)."""
    N, T, C = x.shape
    return x.reshape(N, T, heads, C // heads).transpose(1, 2)


def _merge_heads(x):
    """(N, heads, T, d) -> (N, T, heads*d)."""
    N, H, T, d = x.shape
    return x.transpose(1, 2).reshape(N, T, H * d)


def _check_kv_heads(num_heads, kv_heads):
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide the {num_heads} query heads (each key/value head serves "
                         f"an equal group); use one of {[g for g in range(1, num_heads + 1) if num_heads % g == 0]}")


class _GroupedProjection(nn.Module):
    """Shared set-up of the grouped-query variants: one fused qkv Linear with rows [q (H heads); k (G); v (G)]."""

    def __init__(self, dim, num_heads, kv_heads, qkv_bias):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        _check_kv_heads(num_heads, kv_heads)
        self.num_heads, self.kv_heads = num_heads, kv_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim + 2 * kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project(self, x):
        """(N, T, D) -> q (N, H, T, hd), k and v (N, G, T, hd)."""
        kv_width = self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        return _split_heads(q, self.num_heads), _split_heads(k, self.kv_heads), _split_heads(v, self.kv_heads)


@register_attention("gqa")
class GroupedQueryAttention(_GroupedProjection):
    """Softmax attention with kv_heads key/value heads; query head h reads key/value head h // (H / kv_heads).

    With kv_heads == num_heads the qkv layout, the weights and the output are exactly those of "mha".
    """

    def __init__(self, dim, num_heads, kv_heads=1, qkv_bias=True):
        super().__init__(dim, num_heads, kv_heads, qkv_bias)

    def forward(self, x):
        q, k, v = self.project(x)                                            # (N, H, T, hd), 2 x (N, G, T, hd)
        # enable_gqa shares each key/value head with its group of consecutive query heads without copying it.
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.num_heads)
        return self.proj(_merge_heads(out))                                  # (N, T, D)


@register_attention("shallow")
class ShallowAttention(nn.Module):
    """Softmax attention in a narrower space: q, k, v of width D / compression (head_dim / compression per head),
    and the output projection back from that width."""

    def __init__(self, dim, num_heads, compression=2, qkv_bias=True):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % compression:
            raise ValueError(f"compression {compression} must divide the head dim of {dim} / {num_heads} heads")
        self.num_heads = num_heads
        self.compression = compression
        self.head_dim = dim // num_heads // compression
        inner = self.head_dim * num_heads
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):
        q, k, v = (_split_heads(p, self.num_heads) for p in self.qkv(x).chunk(3, dim=-1))  # 3 x (N, H, T, hd / c)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))            # (N, T, D)


class _PositionBias(nn.Module):
    """Learned (heads, M, T) attention-logit biases between M mediators and the tokens of any square grid.

    A (heads, M, 7, 7) table, bilinearly resized to the grid, plus separable per-row and per-column terms (each a
    length-7 table resized to the grid side). Zero at initialization, so a layer starts as the bias-free form.
    """
    SIDE = 7

    def __init__(self, heads, mediators):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(heads, mediators, self.SIDE, self.SIDE))
        self.rows = nn.Parameter(torch.zeros(heads, mediators, self.SIDE, 1))
        self.cols = nn.Parameter(torch.zeros(heads, mediators, 1, self.SIDE))

    def forward(self, g):
        def resize(t, size):
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        bias = resize(self.table, (g, g)) + resize(self.rows, (g, 1)) + resize(self.cols, (1, g))  # (H, M, g, g)
        return bias.flatten(2)                                                                      # (H, M, T)


@register_attention("mediated")
class MediatedAttention(nn.Module):
    """Attention through M mediator tokens (average-pooled queries), plus a depthwise 3x3 conv of V.

        mediators m = pool(q) to sqrt(M) x sqrt(M)                      (N, H, M, hd)
        v_m = softmax(m k^T / sqrt(hd) + B1) v                            (N, H, M, hd)   O(M T)
        out = softmax(q m^T / sqrt(hd) + B2) v_m + dwconv3x3(v)           (N, H, T, hd)   O(T M)

    Both softmax attentions run through SDPA (the position biases B1, B2 enter as additive masks), so fvcore counts
    them with the SDPA handle. The qkv and proj weights have the "mha" shapes and carry over unchanged.
    """

    def __init__(self, dim, num_heads, mediators=4, position_bias=False, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        side = math.isqrt(mediators)
        if side * side != mediators:
            raise ValueError(f"mediators={mediators} must be a square (4, 16, 64): they are pooled to a square grid")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mediators, self.side = mediators, side
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        # B1: mediators -> tokens (H, M, T); B2: tokens -> mediators, stored as (H, M, T) and transposed.
        self.bias_in = _PositionBias(num_heads, mediators) if position_bias else None
        self.bias_out = _PositionBias(num_heads, mediators) if position_bias else None

    def forward(self, x):
        N, T, D = x.shape
        g = _grid(T)
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                  # 3 x (N, H, T, hd)
        # Mediators: the query map pooled to side x side cells (a grid smaller than side is upsampled by repeats).
        m = F.adaptive_avg_pool2d(_grid_from_heads(q, g), self.side)                   # (N, D, s, s)
        m = _heads_from_grid(m, self.num_heads, self.side)                             # (N, H, M, hd)
        bias_in = self.bias_in(g) if self.bias_in is not None else None                # (H, M, T)
        bias_out = self.bias_out(g).transpose(-1, -2) if self.bias_out is not None else None  # (H, T, M)
        v_m = F.scaled_dot_product_attention(m, k, v, attn_mask=bias_in)               # (N, H, M, hd)
        out = F.scaled_dot_product_attention(q, m, v_m, attn_mask=bias_out)            # (N, H, T, hd)
        local = self.dwc(_grid_from_heads(v, g)).flatten(2).transpose(1, 2)            # (N, T, D)
        return self.proj(_merge_heads(out) + local)


@register_attention("focused")
class FocusedLinearAttention(_GroupedProjection):
    """Focused linear attention with kv_heads key/value heads (multi-query at 1, grouped-query otherwise).

        phi(x) = relu(x) + eps, sharpened: f(x) = phi(x)^p * |phi(x)| / |phi(x)^p|  (direction focused, norm kept)
        out_h = f(q_h) (f(k_g)^T v_g) / (f(q_h) . sum_t f(k_g)_t)  +  dwconv3x3(v_g)       g = h // (H / G)

    K^T V (hd x hd per head) is formed first, so the cost is O(T hd^2) instead of O(T^2 hd). The norm in f is taken
    per token over the head dim (FLatten). normalizer=False reproduces arXiv 2509.17894's code: no division by
    q . sum(k), and the focusing norms taken per head over all tokens and channels; its output then grows with T.
    """
    EPS = 1e-6

    def __init__(self, dim, num_heads, kv_heads=1, power=3, normalizer=True, qkv_bias=True):
        super().__init__(dim, num_heads, kv_heads, qkv_bias)
        if power < 1:
            raise ValueError(f"focusing power must be >= 1, got {power}")
        self.power, self.normalizer = power, normalizer
        width = kv_heads * self.head_dim
        self.dwc = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width)

    def focus(self, x):
        """relu, then raise to `power` keeping the norm: per token (normalizer) or per head over (T, hd) (paper)."""
        x = F.relu(x) + self.EPS
        dims = (-1,) if self.normalizer else (-2, -1)
        # Norms as pow/sum (element-wise work that fvcore leaves uncounted, like the softmax), not linalg norms.
        norm = x.pow(2).sum(dims, keepdim=True).pow(0.5)
        xp = x.pow(self.power)
        return xp * (norm / xp.pow(2).sum(dims, keepdim=True).pow(0.5))

    def forward(self, x):
        N, T, D = x.shape
        g = _grid(T)
        q, k, v = self.project(x)                                  # (N, H, T, hd), 2 x (N, G, T, hd)
        q, k = self.focus(q), self.focus(k)
        G, r, hd = self.kv_heads, self.num_heads // self.kv_heads, self.head_dim
        # The r query heads of a group read the same keys and values: stack them along the tokens.
        q = q.reshape(N, G, r * T, hd)                              # (N, G, rT, hd); heads h = g*r + i
        kv = k.transpose(-1, -2) @ v                                # (N, G, hd, hd): keys and values first
        out = q @ kv                                                # (N, G, rT, hd)
        if self.normalizer:
            z = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)   # (N, G, rT, 1): q . sum_t k_t
            out = out / (z + self.EPS)
        local = _heads_from_grid(self.dwc(_grid_from_heads(v, g)), G, g)   # (N, G, T, hd)
        # The conv of a group's values is shared by its r query heads: broadcast it, no copies.
        out = out.reshape(N, G, r, T, hd) + local.unsqueeze(2)      # (N, G, r, T, hd)
        return self.proj(_merge_heads(out.reshape(N, self.num_heads, T, hd)))
