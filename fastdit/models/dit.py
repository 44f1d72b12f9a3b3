"""The Diffusion Transformer (DiT, Peebles & Xie 2023, arXiv 2212.09748), written from its description.

A DiT maps a noised latent x_t (N, C, H, W), its timestep t (N,) and class label y (N,) to (N, 2C, H, W): the predicted
noise epsilon in the first C channels and the variance-interpolation value v in the last C ("learned sigma").

    x_t --patchify--> tokens (N, T, D) + fixed 2-D sin-cos position
    t, y --embed--> c (N, D)
    tokens --[adaLN-Zero block x depth]--> --final layer--> --unpatchify--> (N, 2C, H, W)

State-dict keys follow the official checkpoints (x_embedder, t_embedder, y_embedder, blocks.i.attn.qkv,
blocks.i.adaLN_modulation, final_layer, ...), so official weights load without renaming.

References: DiT https://arxiv.org/abs/2212.09748; MAE sin-cos position embedding https://arxiv.org/abs/2111.06377;
GLIDE timestep embedding https://arxiv.org/abs/2112.10741.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

from .attention import build_attention
from .mlp import build_mlp


def modulate(x, shift, scale):
    # x: (N, T, D); shift, scale: (N, D), broadcast over tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                      Embedding layers for patches, timesteps and labels       #
#################################################################################

class PatchEmbed(nn.Module):
    """Split (N, C, H, W) into non-overlapping p x p patches and project each to D: (N, T, D), row-major tokens."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D), token index = row * w + col


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the integer timestep, then a 2-layer MLP: (N,) -> (N, D)."""

    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        # DiT divides the frequency exponent by half (freq_shift 0); diffusers' DiT port divides by half - 1
        # (its downscale_freq_shift=1). Kept as a parameter so both conventions can be reproduced exactly.
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def timestep_embedding(self, t, max_period=10000):
        """[cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i / (half - shift)), as in GLIDE: (N,) -> (N, F)."""
        half = self.frequency_embedding_size // 2
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * i / (half - self.freq_shift))     # (F/2,)
        args = t[:, None].float() * freqs[None]                                     # (N, F/2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)           # (N, F), cos first
        if self.frequency_embedding_size % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t))


class LabelEmbedder(nn.Module):
    """Class label -> (N, D). Row `num_classes` is the learned null class that classifier-free guidance needs."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class, at random with dropout_prob, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, force_drop_ids=None):
        # Labels are dropped only while training (so model.eval() matters at sampling time) or when forced.
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT model                                #
#################################################################################

class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning c (adaLN-Zero)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn="mha", attn_kwargs=None, mlp="mlp",
                 mlp_kwargs=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = build_attention(attn, hidden_size, num_heads, **(attn_kwargs or {}))
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = build_mlp(mlp, hidden_size, int(hidden_size * mlp_ratio), **(mlp_kwargs or {}))
        # One projection of c gives shift, scale and gate for both sub-layers; zero-initialized so that every
        # block starts as the identity (the "-Zero" in adaLN-Zero).
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        # x: (N, T, D), c: (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map of each token to its p x p x out_channels patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone. Constructor defaults are DiT-XL/2 at 256x256 (latent 32x32x4)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attn: str = "mha",
        attn_kwargs: dict[str, Any] | None = None,
        mlp: str = "mlp",
        mlp_kwargs: dict[str, Any] | None = None,
        freq_shift: int = 0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not a multiple of patch size {patch_size}")
        # Everything needed to rebuild this architecture; saved beside the weights in fastdit checkpoints.
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, attn=attn, attn_kwargs=dict(attn_kwargs or {}),
            mlp=mlp, mlp_kwargs=dict(mlp_kwargs or {}), freq_shift=freq_shift,
        )
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grad_checkpointing = False  # trade compute for activation memory in training (fast-DiT)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # A frozen Parameter rather than a buffer: official checkpoints store it under "pos_embed" and count it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, attn, attn_kwargs, mlp, mlp_kwargs) for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Every Linear: xavier-uniform weight, zero bias (the fused qkv is one 3D x D matrix).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Fixed 2-D sin-cos position embedding.
        grid_size = self.input_size // self.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # The patch conv is a Linear over flattened patches, so initialize it like one.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Label table and timestep MLP: small normal weights.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero the adaLN projections: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero the final layer: the untrained model outputs exactly 0.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W); token (i, j) vector index (a*p + b)*C + c is pixel (c, i*p + a, j*p + b)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)                    # (N, h, w, p, p, C)
        # A permute rather than an einsum: it is pure data movement, and fvcore counts an einsum as MACs.
        x = x.permute(0, 5, 1, 3, 2, 4)                              # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) noised input; t: (N,) integer timesteps; y: (N,) labels. Returns (N, out_channels, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*out)
        return self.unpatchify(x)  # (N, out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance: eps = eps_u + s * (eps_c - eps_u), for the conditional batch (x, t, y).

        The null-label forward runs on the same x in one doubled batch. By default every latent channel is guided
        (the standard form); `guided_channels=3` reproduces DiT's released sampler, which guides only the first
        3 of 4 epsilon channels ("for exact reproducibility reasons"). The variance channels are never guided.
        """
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, out, H, W)
        cond, uncond = out.chunk(2)
        g = self.in_channels if guided_channels is None else guided_channels
        guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)


#################################################################################
#                          Sine/cosine position embedding                       #
#################################################################################
# Built once in float64 NumPy (as MAE does) so the frozen table is identical on every device.

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim): the first half of the channels encodes the column, the second half the row."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")                                       # (g, g) each, token = row*g + col
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))         # (T, D/2)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))         # (T, D/2)
    return np.concatenate([emb_col, emb_row], axis=1)                           # (T, D)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """(M,) positions -> (M, embed_dim) as [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-i / (embed_dim/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D/2,)
    out = np.outer(pos, omega)                                                   # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)                   # (M, D), sin first
