"""FLOP counting with fvcore, in the paper's convention: multiply-accumulates (GMACs) of one forward at batch 1.

fvcore traces the model and counts one fused multiply-add as one flop, LayerNorm as 4 (no affine) or 5 per element,
and skips element-wise ops (activations, modulation, gating), exactly as the DiT paper's "Gflops" and arXiv 2509.17894's
"GFLOPS" were measured. fvcore has no rule for fused scaled_dot_product_attention and would silently drop the
attention matmuls, so a handle for it is registered here.
"""
import logging
import math
import warnings

import torch

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


def sdpa_flop_jit(inputs, outputs):
    """MACs of softmax(q k^T) v: q (..., L, E), k (..., S, E), v (..., S, Ev) -> prod(...) * L * S * (E + Ev)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def flop_analysis(model, inputs):
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


def example_inputs(model, batch_size=1, device=None):
    """Seeded (x, t, y) shaped for `model`: the profiler input of arXiv 2509.17894 (t < 500, random label)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 500, (batch_size,), generator=g)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g)
    device = device or next(model.parameters()).device
    return x.to(device), t.to(device), y.to(device)


@torch.no_grad()
def analyze(model, batch_size=1):
    """flop_analysis of one eval-mode forward at `batch_size` on example_inputs; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        fca = flop_analysis(model, example_inputs(model, batch_size))
        fca.by_module()  # fvcore traces lazily: trace now, while the model is in eval mode
        return fca
    finally:
        model.train(was_training)


def count_gmacs(model, batch_size=1):
    """GMACs of one forward pass at `batch_size` (the paper's "GFLOPs")."""
    return analyze(model, batch_size).total() / 1e9


def count_params(model):
    """All parameters, the frozen pos_embed included (as the paper and DiT's logs count them)."""
    return sum(p.numel() for p in model.parameters())
