"""Mixture of experts: top-k routed experts in place of DiT's MLP, with the paper's balance loss.

arXiv 2509.17894's three configurations (its section 5.5), at paper scale for cost and speed and mirrored on the
cpu zoo for quality:

    DiT-MoE-S/2-8E2A    8 experts, top-2, every block          zoo: MoE(8, 2, every=1) on every variant
    DiT-MoE-S/2-4E1A    4 experts, top-1, every second block   zoo: MoE(4, 1, every=2) on every variant
    DiT-MoE-XS/2-8E2A   8 experts, top-2, every block          zoo: MoE(8, 2, every=1) on the XS mirrors (mXS/2, mXS/4)

Zoo models are upcycled from the trained dense model (every expert a copy of its MLP) and fine-tuned for STEPS steps
with the paper's balance loss (coefficient 0.005). Each row reports FID/sFID/KID/precision/recall, and beside them the
expert load measured over the very sampling chains that FID scores: per layer the share of each expert (in the report's
info), its normalized entropy and coefficient of variation; plus total and active parameters, active GMACs (fvcore
counts only the routed compute), and the forward speed over the dense model. The full tier adds, on the quick variant,
the ablations (balance "switch" / "none", a capacity limit that drops tokens, training from scratch) and their dense
controls (one expert = the dense MLP, trained the same steps), so an FID difference can be told apart from the effect
of the extra training.

Dispatch: the paper-scale S/2-8E2A forward (sorted dispatch) against a dense S/2 with MLP ratio 8, which has the same
active MACs, timed interleaved in one process, 1 thread: the routed forward must stay within 1.3x of it at batch 8.
The paper's per-expert boolean-mask loop (naive dispatch) is timed beside it, and the dense S/2 gives the throughput
ratio of the MoE model over the model it replaces.
"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit.harness import tiered
from fastdit.harness.gate import Measurement
from fastdit.metrics import cost
from fastdit.metrics.flops import count_gmacs, count_params, example_inputs
from fastdit.models.moe import load_statistics, moe_layers, parameter_counts, routing_trace, set_dispatch
from fastdit.techniques import stack_id
from fastdit.techniques.moe import MoE

STEPS = 200          # upcycled fine-tuning budget (steps of the profile's recipe: batch 64, seed 0)
SCRATCH_STEPS = 300  # from-scratch budget of the full tier's scratch rows and their dense control
DISPATCH_LIMIT = 1.3  # the bound held: MoE forward time / same-active-MACs dense forward time

SETTINGS = [
    MoE(experts=8, top_k=2, every=1, steps=STEPS),   # S/2-8E2A and XS/2-8E2A
    MoE(experts=4, top_k=1, every=2, steps=STEPS),   # S/2-4E1A
]
QUICK = [stack_id(SETTINGS[0])]

ABLATIONS = [
    MoE(experts=8, top_k=2, every=1, balance="switch", coef=0.01, steps=STEPS),   # Switch's form and coefficient
    MoE(experts=8, top_k=2, every=1, balance="none", steps=STEPS),                # no balance loss
    MoE(experts=8, top_k=2, every=1, capacity=1.0, steps=STEPS),                 # tokens dropped past capacity
    MoE(experts=4, top_k=1, every=2, balance="none", steps=STEPS),                # top-1 without balance: frozen router
    MoE(experts=8, top_k=2, every=1, init="scratch", steps=SCRATCH_STEPS, lr=1e-3),
]

# Paper-scale configurations: (dense variant, MoE layout) and the figures of its section 7.4
# (total parameters in millions, active GMACs at batch 1), a cross-check independent of any baseline.
PAPER = {
    "DiT-MoE-S/2-8E2A": ("DiT-S/2", MoE(experts=8, top_k=2, every=1, steps=0), 131.95, 9.70),
    "DiT-MoE-S/2-4E1A": ("DiT-S/2", MoE(experts=4, top_k=1, every=2, steps=0), 53.93, 6.07),
    "DiT-MoE-XS/2-8E2A": ("DiT-XS/2", MoE(experts=8, top_k=2, every=1, steps=0), 29.58, 2.23),
}
PAPER_ROWS = tiered(PAPER, quick=["DiT-MoE-S/2-8E2A"])

_MODELS = {}   # (variant, setting id) -> trained model, shared by the rows and the invariant checks
_QUALITY = {}  # (variant, setting id) -> quality measurements, so a row can cite its dense control's


def _control(setting):
    """The dense control: one expert (= the dense MLP, router irrelevant), same init, budget, lr and seed."""
    return MoE(experts=1, top_k=1, every=1, balance="none", init=setting.init, steps=setting.steps, lr=setting.lr,
               seed=setting.seed)


def _trained(bench, variant, setting):
    key = (variant, stack_id(setting))
    if key not in _MODELS:
        _MODELS[key] = bench.apply(bench.reference_model(variant), setting, variant)
    return _MODELS[key]


def _quality_and_load(bench, variant, setting):
    """Quality of the profile's samples, and the expert load recorded over the same sampling chains: the first
    steps x batches forwards of every layer, the N samples of seed 0 (bench.quality then runs the output fingerprint
    and, when recording, more seeds and the reproducibility perturbations, which are not the protocol's chains)."""
    key = (variant, stack_id(setting))
    if key not in _QUALITY:
        model = _trained(bench, variant, setting)
        p = bench.profile
        forwards = p.sampling_steps * math.ceil(p.fid_samples / p.sample_batch_size)
        with routing_trace(model) as records:
            quality = bench.quality(model, bench.protocol(variant, setting))
        _QUALITY[key] = quality, load_statistics({name: r[:forwards] for name, r in records.items()})
    return _QUALITY[key]


def _load_measurements(load, protocol):
    """Load balance beside FID: the worst layer's normalized entropy and coefficient of variation, the mean entropy,
    and the share of assignments dropped by a capacity limit. Informational (the FID is what is gated)."""
    entropy = [layer["entropy"] for layer in load.values()]
    cv = [layer["cv"] for layer in load.values()]
    dropped = [layer["dropped"] for layer in load.values()]

    def reported(metric, value, direction):
        return Measurement.reported(metric, value, "", direction, protocol, tolerance=0.25)
    return [reported("load_entropy_min", min(entropy), "higher"),
            reported("load_entropy_mean", sum(entropy) / len(entropy), "higher"),
            reported("load_cv_max", max(cv), "lower"), reported("dropped_share", sum(dropped) / len(dropped), "lower")]


def _row(bench, variant, setting):
    dense = bench.reference_model(variant)
    model = _trained(bench, variant, setting)
    layers = moe_layers(model)
    assert len(layers) == len(range(0, len(model.blocks), setting.every))
    # The trained model's two dispatches agree (same routing, same experts).
    x, t, y = example_inputs(model, 8, bench.device)
    naive = set_dispatch(copy.deepcopy(model), "naive")
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), naive(x, t, y), rtol=1e-4, atol=1e-5)

    protocol = bench.protocol(variant, setting)
    quality, load = _quality_and_load(bench, variant, setting)
    measurements = list(quality) + _load_measurements(load, protocol)
    control = _control(setting)
    if bench.tier == "full" and control != setting:
        # Negative: the MoE beat the dense model trained the same steps.
        measurements.append(bench.against_control(quality, _quality_and_load(bench, variant, control)[0]))
    batch = bench.profile.throughput_batch_sizes[-1]
    total, active = parameter_counts(model)
    measurements += bench.cost(model, protocol, batch_size=batch)
    measurements.append(Measurement.exact("active_params", active, "", protocol))
    measurements += bench.speedup(dense, model, protocol, batch_size=batch)
    bench.check(measurements, load=load, total_params=total, active_params=active)


def test_moe(bench, variant, setting):
    """The paper's layouts on every zoo variant: quality, expert load, parameters, active GMACs, speed."""
    _row(bench, variant, setting)


@pytest.mark.parametrize("setting", tiered(ABLATIONS + [_control(SETTINGS[0]), _control(ABLATIONS[-1])], quick=(),
                                           id=stack_id))
def test_moe_ablation(bench, setting):
    """Balance losses, a capacity limit, training from scratch, and the dense controls, on the quick variant."""
    _row(bench, bench.profile.quick_variants[0], setting)


# --------------------------------------------------------------------------------------------- paper scale

def _paper_model(bench, name):
    variant, setting, _, _ = PAPER[name]
    return bench.apply(bench.paper_model(variant), setting, variant).eval()


@pytest.mark.parametrize("name", PAPER_ROWS)
def test_paper_cost(bench, name):
    """Total and active parameters and active GMACs of the paper's three MoE models (at the profile's paper_shape)."""
    variant, setting, params_m, gmacs = PAPER[name]
    model = _paper_model(bench, name)
    total, active = parameter_counts(model)
    assert total == count_params(model) and abs(total / 1e6 - params_m) <= 0.01  # the paper gives 2 decimals, "≈"
    assert abs(count_gmacs(model) - gmacs) <= 0.01
    # Active parameters: the dense model's, plus a router per MoE layer and k - 1 more experts per token.
    dense = bench.paper_model(variant)
    expert = sum(p.numel() for p in dense.blocks[0].mlp.parameters())
    routers = sum(p.numel() for layer in moe_layers(model).values() for p in layer.router.parameters())
    assert active == count_params(dense) + routers + len(moe_layers(model)) * (setting.top_k - 1) * expert
    protocol = bench.protocol(variant, setting, scale="paper", model=name)
    measurements = bench.cost(model, protocol, batch_size=1)
    measurements.append(Measurement.exact("active_params", active, "", protocol))
    bench.check(measurements, total_params=total, active_params=active)


@pytest.mark.parametrize("batch", tiered([1, 8], quick=["batch1"], id=lambda b: f"batch{b}"))
def test_dispatch(bench, batch):
    """S/2-8E2A forward (sorted and naive dispatch) against dense S/2 with MLP ratio 8 (the same active MACs) and the
    dense S/2, interleaved in one process at 1 thread. Batch 8 is the acceptance: within 1.3x of the same-MACs model."""
    name = "DiT-MoE-S/2-8E2A"
    variant, setting, _, _ = PAPER[name]
    moe = _paper_model(bench, name)
    same_macs = bench.paper_model(variant, mlp_ratio=8)
    dense = bench.paper_model(variant)
    assert abs(count_gmacs(same_macs) / count_gmacs(moe) - 1) < 0.01  # the router's MACs are the difference
    x, t, y = example_inputs(moe, batch, bench.device)

    def run(dispatch):
        def call():
            set_dispatch(moe, dispatch)
            return moe(x, t, y)
        return call

    with torch.inference_mode():
        torch.testing.assert_close(run("sorted")(), run("naive")(), rtol=1e-4, atol=1e-5)
        timings = cost.time_interleaved({"same_macs": lambda: same_macs(x, t, y), "sorted": run("sorted"),
                                         "naive": run("naive"), "dense": lambda: dense(x, t, y)},
                                        device=bench.device, warmup=1, rounds=bench.rounds or 5,
                                        threads=1 if bench.device == "cpu" else None)
    set_dispatch(moe, "sorted")
    protocol = bench.protocol(variant, setting, scale="paper", model=name, batch_size=batch,
                              threads=1 if bench.device == "cpu" else None)
    out = []
    # Each ratio is t_reference / t_candidate (higher = the candidate is faster), with its bootstrap CI.
    for metric, reference, candidate, gated in [("sorted_vs_same_macs", "same_macs", "sorted", True),
                                                ("naive_vs_same_macs", "same_macs", "naive", False),
                                                ("sorted_vs_naive", "naive", "sorted", True),
                                                ("sorted_vs_dense", "dense", "sorted", True)]:
        s = cost.speedup(timings[reference], timings[candidate])
        # At batch 1 the ratios compare different op mixes (routing overhead vs matmuls) and drifted 11% between
        # unchanged runs: reported there, gated at batch 8.
        out.append(Measurement.speedup(metric, s, protocol, extra=dict(gated=gated and batch != 1,
                                                                       timing=timings[candidate].samples,
                                                                       reference_timing=timings[reference].samples)))
    ratio = {m.metric: m for m in out}["sorted_vs_same_macs"]
    if batch == 8:  # the acceptance, failed only when the whole CI is past the limit (not on one noisy round)
        assert ratio.ci[1] >= 1 / DISPATCH_LIMIT, (
            f"S/2-8E2A forward takes {1 / ratio.value:.2f}x the time of the same-MACs dense model "
            f"(CI upper speed {ratio.ci[1]:.3f} < {1 / DISPATCH_LIMIT:.3f}): the dispatch overhead is past 1.3x")
    bench.check(out, median_ms={k: v.median_s * 1e3 for k, v in timings.items()})


# ------------------------------------------------------------------------------------------------ invariants

@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), seed=st.integers(0, 2 ** 16), capacity=st.booleans())
def test_trained_moe_invariants(bench_session, variant, batch, seed, capacity):
    """On the quick row's trained model: sorted dispatch equals the naive loop, each sample's output is independent
    of the rest of its batch (routing is per token), every token reaches exactly k experts, and with a capacity limit
    the two dispatches still agree (the same assignments dropped)."""
    setting = SETTINGS[0]
    model = _trained(bench_session, variant, setting)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(bench_session.device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(bench_session.device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(bench_session.device)
    layers = moe_layers(model).values()
    for layer in layers:
        layer.capacity = 1.0 if capacity else 0.0
    try:
        with torch.no_grad(), routing_trace(model) as records:
            fast = model(x, t, y)
        with torch.no_grad():
            naive = set_dispatch(model, "naive")(x, t, y)
            alone = set_dispatch(model, "sorted")(x[:1], t[:1], y[:1])
    finally:
        set_dispatch(model, "sorted")
        for layer in layers:
            layer.capacity = 0.0
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)
    tokens = batch * (model.input_size // model.patch_size) ** 2
    for stats in records.values():
        assert stats[0].assigned.sum() == setting.top_k * tokens
        assert (stats[0].kept == stats[0].assigned).all() or capacity
    if not capacity:
        torch.testing.assert_close(fast[:1], alone, rtol=1e-4, atol=1e-5)
