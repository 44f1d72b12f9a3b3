"""FLOP counting with fvcore, in the paper's convention: multiply-accumulates (GMACs) of one forward at batch 1.

fvcore traces the model and counts one fused multiply-add as one flop, LayerNorm as 4 (no affine) or 5 per element,
and skips element-wise ops (activations, modulation, gating), exactly as the DiT paper's "Gflops" and arXiv 2509.17894's
"GFLOPS" were measured. fvcore has no rule for fused scaled_dot_product_attention and would silently drop the
attention matmuls, so a handle for it is registered here.

`analytic_gmacs` gives the same count from the layer shapes alone, without tracing: the check that a pruned network
(heads, MLP channels or blocks removed) costs what its shapes say.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..models.attention import Attention
from ..models.mlp import Mlp

with warnings.catch_warnings():
    # fvcore scripts a focal loss at import time, which torch >= 2.10 flags as deprecated; nothing of ours uses it.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

# Ops fvcore sees but deliberately does not count (element-wise work and lookups, not multiply-accumulates).
UNCOUNTED_OPS = {
    "aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub", "aten::rsub", "aten::div", "aten::exp",
    "aten::sin", "aten::cos", "aten::silu", "aten::gelu", "aten::embedding", "aten::lt", "aten::rand",
    "aten::where", "aten::full_like", "aten::softmax", "aten::relu", "aten::pow", "aten::mean", "aten::sum",
    "aten::zeros_like", "aten::ones_like", "aten::sigmoid", "aten::tanh", "aten::neg",
}


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of softmax(q k^T) v: q (..., L, E), k (..., S, E), v (..., S, Ev) -> prod(...) * L * S * (E + Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def flop_analysis(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> FlopCountAnalysis:
    """An fvcore FlopCountAnalysis of model(*inputs) with attention counted; raises if an unknown op is skipped."""
    fca = FlopCountAnalysis(model, inputs)
    fca.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    # fvcore logs through `logging`; keep its tracer chatter out of test and CLI output.
    logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
    fca.total()
    missed = set(fca.unsupported_ops()) - UNCOUNTED_OPS
    if missed:
        raise RuntimeError(f"fvcore skipped ops that do multiply-accumulates: {sorted(missed)}; "
                           "register a handle for them in fastdit.metrics.flops")
    return fca


def example_inputs(model: nn.Module, batch_size: int = 1,
                   device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (x, t, y) shaped for `model`: the profiler input of arXiv 2509.17894 (t < 500, random label); x in
    the dtype of the model's weights (a bfloat16 model takes bfloat16 latents)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 500, (batch_size,), generator=g)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g)
    weight = next(model.parameters())
    device = device or weight.device
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return x.to(device, dtype), t.to(device), y.to(device)


@torch.no_grad()
def analyze(model: nn.Module, batch_size: int = 1) -> FlopCountAnalysis:
    """flop_analysis of one eval-mode forward at `batch_size` on example_inputs; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        fca = flop_analysis(model, example_inputs(model, batch_size))
        fca.by_module()  # fvcore traces lazily: trace now, while the model is in eval mode
        return fca
    finally:
        model.train(was_training)


def count_gmacs(model: nn.Module, batch_size: int = 1) -> float:
    """GMACs of one forward pass at `batch_size` (the paper's "GFLOPs")."""
    return analyze(model, batch_size).total() / 1e9


def _dynamic_int8_linear_flops(input_shape, packed_params, *args, out_shape=None, **kwargs) -> int:
    # (..., in) x (in, out): two FLOPs per multiply-add, as torch's own table counts addmm
    return 2 * math.prod(input_shape) * out_shape[-1]


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def dispatched_gmacs(fn: Any) -> float:
    """GMACs of every matmul, convolution and attention that fn() dispatches, counted while it runs (torch's
    FlopCounterMode), whatever control flow decides what runs. Two kernels torch's table lacks are counted as what they
    compute: the CPU's fused attention (as torch counts the CUDA ones) and PyTorch's dynamic int8 Linear (as the fp32
    Linear it replaces). On a DiT forward it is within 0.5 % of fvcore's count_gmacs (tested)."""
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {}
    if hasattr(torch.ops, "quantized") and hasattr(torch.ops.quantized, "linear_dynamic"):
        mapping[torch.ops.quantized.linear_dynamic] = _dynamic_int8_linear_flops
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return counter.get_total_flops() / 2e9


def count_params(model: nn.Module) -> int:
    """All parameters, the frozen pos_embed included (as the paper and DiT's logs count them)."""
    return sum(p.numel() for p in model.parameters())


def analytic_gmacs(model: nn.Module, batch_size: int = 1) -> dict[str, float]:
    """GMACs of one forward from the layer shapes alone, in fvcore's convention (one multiply-add = 1, LayerNorm
    without affine = 4 per element, element-wise work free), split like fastdit.metrics.cost.gmacs_breakdown.

    Per block with T tokens, width D, H' heads of hd (inner = H' * hd) and MLP hidden h:
    attention = T*D*3*inner (qkv) + 2*T*T*inner (q k^T and p v) + T*inner*D (proj); MLP = 2*T*D*h."""
    T = (model.input_size // model.patch_size) ** 2
    conv = model.x_embedder.proj
    D = conv.out_channels
    other = T * D * conv.in_channels * model.patch_size ** 2                    # patch embedding
    other += sum(m.in_features * m.out_features for m in model.t_embedder.mlp if isinstance(m, nn.Linear))
    attention = mlp = 0
    for i, block in enumerate(model.blocks):
        if not (isinstance(block.attn, Attention) and isinstance(block.mlp, Mlp)):
            raise TypeError(f"analytic_gmacs counts 'mha' attention and the 'mlp' feed-forward; block {i} has "
                            f"{type(block.attn).__name__} and {type(block.mlp).__name__}: use count_gmacs (fvcore)")
        inner = block.attn.qkv.out_features // 3
        attention += T * D * 3 * inner + 2 * T * T * inner + T * inner * block.attn.proj.out_features
        mlp += T * (block.mlp.fc1.in_features * block.mlp.fc1.out_features
                    + block.mlp.fc2.in_features * block.mlp.fc2.out_features)
        ada = block.adaLN_modulation[-1]
        other += 2 * 4 * T * D + ada.in_features * ada.out_features              # two LayerNorms, adaLN
    final = model.final_layer
    other += 4 * T * D + final.adaLN_modulation[-1].in_features * final.adaLN_modulation[-1].out_features
    other += T * final.linear.in_features * final.linear.out_features
    total = attention + mlp + other
    return {k: batch_size * v / 1e9 for k, v in dict(total=total, attention=attention, mlp=mlp, other=other).items()}
