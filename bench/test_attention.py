"""Simplified attention (arXiv 2509.17894 section on attention; fastdit.techniques.attention.SwapAttention).

Every block's attention is swapped for a cheaper variant: softmax grouped-/multi-query (gqa), mediated attention
(M pooled mediator tokens), shallow attention (q, k, v at half width) and focused linear attention with one or two
key/value heads, with FLatten's normalizer or in the paper's unnormalized form. The paper trained each variant from
scratch (full tier rows, the zoo's 1,500-step recipe); the default here converts the trained reference and fine-tunes
it for 200 steps (cached after the first run).

Rows per setting and variant: sample quality (FID, sFID, ... of the fine-tuned model); cost (GMACs split into
attention / MLP / other, params, size, peak memory) and the forward's speed ratio over the reference, measured on the
converted architecture before fine-tuning (weights do not change cost or dense speed); forward invariants. The scaling
rows time one attention layer at the width of DiT-mS (128, 4 heads) from 64 to 4,096 tokens, interleaved with
standard attention, and fit the exponent of time and of fvcore's count in the token count.
"""
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastdit.harness import tiered
from fastdit.harness.gate import DEFAULT_RULES, Measurement
from fastdit.metrics import cost
from fastdit.metrics.flops import flop_analysis
from fastdit.models.attention import build_attention
from fastdit.techniques import stack_id
from fastdit.techniques.attention import SwapAttention

SETTINGS = [
    SwapAttention(kind="gqa", kv_heads=1),                         # softmax multi-query
    SwapAttention(kind="gqa", kv_heads=2),                         # softmax grouped-query (4-head variants only)
    SwapAttention(kind="mediated", mediators=4),                   # the paper's ma4
    SwapAttention(kind="mediated", mediators=16),                  # the paper's ma16
    SwapAttention(kind="mediated", mediators=4, position_bias=True),  # with Attention Mediators' position biases
    SwapAttention(kind="shallow", compression=2),                  # the paper's shal
    SwapAttention(kind="focused", kv_heads=1),                     # the paper's fmq, normalized
    SwapAttention(kind="focused", kv_heads=2),                     # the paper's fgq (2 kv heads), normalized
    SwapAttention(kind="focused", kv_heads=1, normalizer=False),   # fmq exactly as the paper's code (no normalizer)
    SwapAttention(kind="mediated", mediators=4, init="scratch", steps=1500),   # the paper's way: from scratch
    SwapAttention(kind="focused", kv_heads=2, init="scratch", steps=1500),
]
# The quick tier's representative row: focused multi-query linear attention, the paper's cheapest variant.
QUICK = [stack_id(SwapAttention(kind="focused", kv_heads=1))]

# The scaling rows: one attention layer at DiT-mS width, standard attention timed alongside each.
WIDTH, HEADS = 128, 4
TOKENS = (64, 256, 1024, 4096)
FIT_FROM = 256          # exponents are fitted on T >= 256: below T ~ WIDTH the (linear) projections dominate
LINEAR = {"focused", "mediated"}
LAYERS = {
    "focused-mq": ("focused", dict(kv_heads=1)),
    "focused-gq": ("focused", dict(kv_heads=2)),
    "mediated-4": ("mediated", dict(mediators=4)),
    "mediated-16": ("mediated", dict(mediators=16)),
    "gqa-mq": ("gqa", dict(kv_heads=1)),
    "shallow": ("shallow", dict(compression=2)),
}
QUICK_LAYERS = ("focused-mq",)
SPEEDUP_AT_MAX_RULE = dict(DEFAULT_RULES["speed"], threshold=0.25)


def _skip_unless_fits(setting, variant, model):
    heads = model.num_heads
    if getattr(setting, "kv_heads", 1) and heads % setting.kv_heads:
        pytest.skip(f"{variant} has {heads} heads: {setting.kv_heads} key/value heads cannot serve equal groups")


def _architecture(bench, variant, setting):
    """The converted architecture without training: what cost and dense speed depend on."""
    reference = bench.reference_model(variant).eval()
    _skip_unless_fits(setting, variant, reference)
    return reference, bench.apply(reference, dataclasses.replace(setting, init="convert", steps=0), variant)


def test_quality(bench, variant, setting):
    reference = bench.reference_model(variant)
    _skip_unless_fits(setting, variant, reference)
    model = bench.apply(reference, setting, variant)
    assert model.config["attn"] == setting.kind
    bench.check(bench.quality(model, bench.protocol(variant, setting)))


def test_cost(bench, variant, setting):
    reference, model = _architecture(bench, variant, setting)
    batch = bench.profile.throughput_batch_sizes[-1]
    protocol = bench.protocol(variant, setting)
    parts = cost.gmacs_breakdown(model)
    share = Measurement.exact("attention_share", round(parts["attention"] / parts["total"], 6), "of GMACs", protocol)
    with torch.inference_mode():
        speed = bench.speedup(reference, model, protocol, batch_size=batch)
    bench.check(bench.cost(model, protocol, batch_size=batch) + [share] + speed)


_BUILT = {}


@given(batch=st.integers(2, 4), seed=st.integers(0, 2 ** 16))
def test_forward_invariants(bench_session, variant, setting, batch, seed):
    """Shape and finiteness, and permuting the batch permutes the output (no sample reads another's tokens)."""
    key = (variant, stack_id(setting))
    if key not in _BUILT:   # built once: hypothesis calls this test 20 times
        _BUILT[key] = _architecture(bench_session, variant, setting)[1].cpu()
    model = _BUILT[key]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    perm = torch.randperm(batch, generator=g)
    with torch.no_grad():
        out = model(x, t, y)
        permuted = model(x[perm], t[perm], y[perm])
    assert out.shape == (batch, model.out_channels, model.input_size, model.input_size)
    assert torch.isfinite(out).all()
    # the paper's unnormalized focused attention grows with the tokens: the tolerance scales with the output
    torch.testing.assert_close(permuted, out[perm], rtol=1e-4, atol=1e-5 * out.abs().max().item())


def _exponent(tokens, values):
    """Least-squares slope of log(value) on log(tokens) over tokens >= FIT_FROM."""
    keep = [i for i, t in enumerate(tokens) if t >= FIT_FROM]
    return float(np.polyfit(np.log([tokens[i] for i in keep]), np.log([values[i] for i in keep]), 1)[0])


def _layer_macs(layer, tokens):
    """fvcore MACs of one layer's forward at batch 1."""
    return flop_analysis(layer, (torch.randn(1, tokens, WIDTH),)).total()


@pytest.mark.parametrize("name", tiered(LAYERS, QUICK_LAYERS))
def test_scaling(bench, name):
    """Time, fvcore MACs and peak memory of one attention layer at 64..4,096 tokens (1 thread, interleaved with
    standard attention of the same width): the fitted exponents, and the speed and memory ratios over standard
    attention at 4,096."""
    kind, kwargs = LAYERS[name]
    torch.manual_seed(0)
    layers = {"mha": build_attention("mha", WIDTH, HEADS).to(bench.device).eval(),
              name: build_attention(kind, WIDTH, HEADS, **kwargs).to(bench.device).eval()}
    times = {k: [] for k in layers}
    peaks = {k: [] for k in layers}   # bytes allocated above the input during one forward
    macs = {k: [_layer_macs(layer.cpu(), T) for T in TOKENS] for k, layer in layers.items()}
    for layer in layers.values():
        layer.to(bench.device)
    with torch.inference_mode():
        for T in TOKENS:
            x = torch.randn(1, T, WIDTH, generator=torch.Generator().manual_seed(T)).to(bench.device)
            timing = cost.time_interleaved({k: (lambda layer=layer: layer(x)) for k, layer in layers.items()},
                                           device=bench.device, warmup=1,
                                           rounds=bench.rounds or (9 if T == TOKENS[-1] else 5),
                                           threads=1 if bench.device == "cpu" else None)
            for k, layer in layers.items():
                times[k].append(timing[k])
                peaks[k].append(cost.peak_memory_bytes(lambda layer=layer: layer(x), bench.device))
    exponents = {k: _exponent(TOKENS, [t.median_s for t in times[k]]) for k in layers}
    cost_exponents = {k: _exponent(TOKENS, macs[k]) for k in layers}
    memory_exponents = {k: _exponent(TOKENS, peaks[k]) for k in layers}
    at_max = cost.speedup(times["mha"][-1], times[name][-1])
    protocol = dict(scale="layer", variant=f"attention-{WIDTH}x{HEADS}", technique=name, kind=kind, settings=kwargs,
                    device=bench.machine["device"], dtype="float32", mode="eager", batch_size=1, tokens=list(TOKENS),
                    fit_from=FIT_FROM, threads=1 if bench.device == "cpu" else None)
    fit = dict(tolerance=0.15, scope="hardware")  # how the reported exponents are shown
    out = [Measurement.exact("macs_exponent", round(cost_exponents[name], 4), "", protocol),
           # Reported, not gated: fitted over timings of different op mixes, it drifted 15% between unchanged runs.
           Measurement.reported("time_exponent", exponents[name], "", "lower", protocol, **fit),
           Measurement.reported("reference_time_exponent", exponents["mha"], "", "higher", protocol, **fit),
           # A ratio of a bandwidth-bound O(T^2) op to a linear one: it moves with the memory system and with what
           # shares it. Focused MQA read 15.1-15.6x in three quiet runs of one session and 9.6-12.5x in seven of a
           # later one on the same fingerprint (once 25% below its baseline, significant), so it is reported, not
           # gated. Losing the linear scaling would take it to ~1x: the 2x acceptance bar is asserted below.
           Measurement.speedup(f"speedup_at_{TOKENS[-1]}", at_max, protocol, SPEEDUP_AT_MAX_RULE,
                               extra=dict(timing=times[name][-1].samples, reference_timing=times["mha"][-1].samples,
                                          gated=False))]
    # Peak memory is an allocator count, not a timing: it repeats exactly on one kernel set, so it is gated at the
    # memory rule. On CPU every layer's peak at 4,096 tokens was byte-identical under torch's default and AVX2
    # kernels (softmax 10,485,760 B, focused MQA 12,652,544 B), so it gates on any CPU with the same torch; on a GPU
    # the card picks the attention kernel (a fused softmax never holds the T x T scores), so only on the same card.
    device = bench.machine["device"]
    out += [Measurement.memory(f"peak_memory_bytes_at_{TOKENS[-1]}", peaks[name][-1], "B", protocol, device),
            Measurement.memory(f"memory_ratio_at_{TOKENS[-1]}", round(peaks[name][-1] / peaks["mha"][-1], 4), "x",
                               protocol, device),
            Measurement.reported("memory_exponent", round(memory_exponents[name], 4), "", "lower", protocol, **fit),
            Measurement.reported("reference_memory_exponent", round(memory_exponents["mha"], 4), "", "lower", protocol,
                                 **fit)]
    out += [Measurement.absolute_time(f"ms_at_{T}", times[name][i].median_s * 1e3, "ms", protocol,
                                      noise=times[name][i].iqr_s * 1e3, extra=dict(gated=False))
            for i, T in enumerate(TOKENS)]
    # The acceptance bars: linear variants near 1 and >= 2x faster than softmax at 4,096 tokens, softmax near 2.
    assert 1.6 < cost_exponents["mha"] < 2.0 and 1.5 < exponents["mha"] < 2.3, (cost_exponents, exponents)
    if kind in LINEAR:
        assert abs(cost_exponents[name] - 1) < 0.01, cost_exponents
        assert exponents[name] < 1.3, exponents
        assert at_max["ratio"] >= 2, at_max
        assert memory_exponents[name] < 1.2, memory_exponents   # no T x T buffer anywhere in a linear variant
    bench.check(out, exponents=exponents, macs=macs, peak_memory_bytes=peaks)
