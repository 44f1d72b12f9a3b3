"""Timestep caching: does the cached chain make images faster, compute less, and keep their quality?

Every row runs the whole sampling chain (the profile's sampler and steps) of the cached model against the plain chain
of the same model, timed interleaved in this run, and counts what the cached chain computed:

    chain_speedup           images/s of the cached chain over the plain chain (gated: the speed rule)
    evaluations_per_image   full network evaluations computed per image: steps minus cache hits (gated, 5 %)
    gmacs_per_image         multiply-adds dispatched per image over the chain, counted by torch (gated, 5 %)
    cache_hit_rate          the share of steps that reused the cache (reported)
    chain_peak_memory_bytes peak memory of one chain above the weights: the cached residuals count (memory rule)
    quality                 FID / sFID / KID / precision / recall under the profile's protocol, with the samples'
                            fingerprint, and each metric's distance from the plain model's stored baseline (reported)

Paper scale: DiT-S/2 at 32x32x4 (seeded random weights) at batch 1 (and 64 on a GPU), eager and with its attention and
MLP compiled. Random weights make an adaptive rule's hit rate meaningless, so the adaptive rules run there at
threshold 0, where they never reuse: the row is the price of the rule itself. The static rules' hits do not depend on
the weights, so theirs is the real speedup at full size.

Stacks: a cache after int8 quantization and after head removal, each timed interleaved with the plain chain, the
technique alone and the cache alone, so that the combined ratio stands beside each one's.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit.diffusion import create_diffusion
from fastdit.harness import tiered
from fastdit.sampling import generate
from fastdit.techniques import stack_id
from fastdit.techniques.caching import FirstBlockCache, InputChangeCache, StaticCache, cache_stats
from fastdit.techniques.pruning import PruneHeads
from fastdit.techniques.quantization import Quantize

import test_reference  # the sibling bench module whose quality baselines the rows are set beside

# Thresholds span the adaptive rules' useful range on the cpu zoo's DDIM-25 chain, whose relative changes run from
# ~0.005 (early steps) to ~0.3 (the last). Measured on DiT-mS/4 (32 samples): input-change 0.05 / 0.1 / 0.2 reuse
# 47 / 64 / 79 % of the steps, first-block 0.02 / 0.05 / 0.1 reuse 27 / 50 / 67 %.
SETTINGS = [StaticCache(n) for n in (2, 3, 4)] + [StaticCache(n, "attn-mlp") for n in (2, 3)] + \
    [InputChangeCache(t) for t in (0.05, 0.1, 0.2)] + [FirstBlockCache(t) for t in (0.02, 0.05, 0.1)]
QUICK = [StaticCache(2).id, FirstBlockCache(0.05).id]
SWEEP_VARIANTS = "quick"  # every setting on the quick variants; the other variants take the QUICK ones (full tier)

PAPER_VARIANT = "DiT-S/2"
PAPER_SETTINGS = [StaticCache(2), StaticCache(2, "attn-mlp"), InputChangeCache(0.0), FirstBlockCache(0.0)]
# One S/2 forward at batch 1 takes ~0.25 s on one thread of this machine's CPU: a 10-step chain, timed 7 rounds against
# the plain chain, is ~40 s a row.
PAPER_STEPS = 10

STACKS = [(Quantize("int8-dynamic-cpu", "all"), StaticCache(2)), (PruneHeads(0.5, "remove"), StaticCache(2))]


def _rows(bench, variant, model, reference, protocol, info):
    """The chain measurements of a cached model against its plain chain, after checking that it never computes more
    than the plain chain (counted over the same chain)."""
    measurements = bench.sampling_speed(model, protocol, reference=reference)
    counts = bench.chain_counts(model, protocol)
    plain = {m.metric: m.value for m in bench.chain_counts(reference, protocol)}
    got = {m.metric: m.value for m in counts}
    assert got["gmacs_per_image"] <= plain["gmacs_per_image"] * (1 + 1e-9), \
        f"the cached chain computed {got['gmacs_per_image']:.4f} GMACs per image, more than the plain chain's " \
        f"{plain['gmacs_per_image']:.4f}"
    assert got["evaluations_per_image"] <= plain["evaluations_per_image"]
    info.update(gmacs_ratio=got["gmacs_per_image"] / plain["gmacs_per_image"], hit_rate=got["cache_hit_rate"])
    measurements += counts
    measurements.append(bench.chain_memory(model, protocol))
    quality = bench.quality(model, protocol)
    return measurements + quality + bench.against_reference(test_reference.test_quality, quality, variant, info)


# ---------------------------------------------------------------------------------------------------- the zoo

def test_zoo(bench, variant, setting):
    """The trained zoo model with the cache: chain speed against the plain chain, what it computed, memory, quality."""
    reference = bench.reference_model(variant)
    model = bench.apply(bench.reference_model(variant), setting, variant)
    info = {}
    bench.check(_rows(bench, variant, model, reference, bench.protocol(variant, setting), info), **info)


@pytest.mark.parametrize("stack", tiered(STACKS, quick=(), id=stack_id))
def test_stacked(bench, stack):
    """A cache after another technique, on the profile's first quick variant: the combined chain's ratio to the plain
    chain (gated, with its counts, memory and quality) beside the ratios of the technique alone and the cache alone,
    all four chains timed interleaved in the same rounds."""
    variant = bench.profile.quick_variants[0]
    technique, cache = stack
    reference = bench.reference_model(variant)
    alone = {"technique": bench.apply(bench.reference_model(variant), technique, variant),
             "cache": bench.apply(bench.reference_model(variant), cache, variant)}
    model = bench.apply(bench.reference_model(variant), list(stack), variant)
    protocol = bench.protocol(variant, list(stack))
    info = {}
    measurements = _rows(bench, variant, model, reference, protocol, info)
    ratios = bench.chain_speedups(reference, dict(alone, stacked=model), protocol)
    info.update({f"{name}_chain_speedup": m.value for name, m in ratios.items()})
    info["stacked_over_technique"] = ratios["stacked"].value / ratios["technique"].value
    info["stacked_over_cache"] = ratios["stacked"].value / ratios["cache"].value
    measurements += [m for name, m in ratios.items() if name != "stacked"]
    bench.check(measurements, **info)


# ------------------------------------------------------------------------------------------------- paper scale

@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("paper_setting", tiered(PAPER_SETTINGS, quick=(), id=stack_id))
def test_paper_scale(bench, paper_setting, mode):
    """DiT-S/2 at 32x32x4: images/s of the profile's chain with the cache over the plain chain, at batch 1 (and 64 on
    a GPU), eager or with every block's attention and MLP compiled (the cache's decisions stay in Python)."""
    reference = bench.paper_model(PAPER_VARIANT)
    model = bench.apply(bench.paper_model(PAPER_VARIANT), paper_setting, PAPER_VARIANT)
    if mode == "compile":
        for net in (reference, model):
            for block in net.blocks:
                block.attn.compile()
                block.mlp.compile()
    p = bench.profile
    measurements = []
    batches = (1, 64) if bench.device.startswith("cuda") else (1,)
    for batch in batches:
        protocol = bench.protocol(PAPER_VARIANT, paper_setting, scale="paper", mode=mode, sampler=p.sampler,
                                  steps=PAPER_STEPS)
        rows = bench.sampling_speed(model, protocol, batch_size=batch, reference=reference,
                                    reference_chain=protocol)
        # what the chain computes does not depend on compiling: counted once, on the eager rows
        counts = bench.chain_counts(model, protocol, batch_size=batch) if mode == "eager" else []
        for m in rows + counts:
            m.metric = f"{m.metric}_b{batch}" if len(batches) > 1 else m.metric
        measurements += rows + counts
    bench.check(measurements)


# --------------------------------------------------------------------------------------------- invariants

@settings(deadline=None, max_examples=8)
@given(technique=st.sampled_from(SETTINGS), n=st.integers(1, 4), seed=st.integers(0, 2 ** 16),
       cfg=st.sampled_from([1.0, 3.0]))
def test_invariants(bench_session, variant, technique, n, seed, cfg):
    """On the trained model, for any cache setting, batch and seed: the counted full evaluations equal steps minus the
    cache hits; the cached chain never computes more multiply-adds than the same rule when it never hits; sample i is
    the same alone as in its batch (up to the float rounding of other batch shapes); and interval 1 / threshold 0
    reproduce the plain chain bit for bit."""
    from torch.utils.flop_counter import FlopCounterMode
    p = bench_session.profile
    reference = bench_session.reference_model(variant, device="cpu")
    model = bench_session.apply(bench_session.reference_model(variant, device="cpu"), technique, variant)
    diffusion = create_diffusion(p.sampling_steps, num_timesteps=p.num_timesteps, learn_sigma=reference.learn_sigma)
    kw = dict(seed=seed, cfg_scale=cfg, sampler=p.sampler, clip_denoised=p.clip_denoised)
    computed = []  # rows that ran the last block's MLP, per call: the stack ran for them
    hook = model.blocks[-1].mlp.register_forward_hook(lambda mod, args, out: computed.append(args[0].shape[0]))
    counters = [FlopCounterMode(display=False) for _ in range(2)]
    with counters[0]:
        together = generate(model, diffusion, range(n), batch_size=n, **kw)[0]
    hook.remove()
    with counters[1]:
        plain = generate(reference, diffusion, range(n), batch_size=n, **kw)[0]
    stats = cache_stats(model)
    rows_per_sample = 2 if cfg > 1 else 1
    assert sum(computed) / rows_per_sample == n * p.sampling_steps - stats["hits"]
    exact = StaticCache(1, technique.parts) if isinstance(technique, StaticCache) else type(technique)(0.0)
    same = bench_session.apply(bench_session.reference_model(variant, device="cpu"), exact, variant)
    never = FlopCounterMode(display=False)
    with never:
        never_hits = generate(same, diffusion, range(n), batch_size=n, **kw)[0]
    # Skipping never adds work: the chain computes at most what the same rule computes when it never hits (the
    # plain chain plus the cost of deciding, a rule's extra modulation: +0.016 % over the plain chain on an
    # untrained DiT-S/2 that the cache never skipped, which the plain chain is no bound for).
    assert counters[0].get_total_flops() <= never.get_total_flops()
    alone = torch.cat([generate(model, diffusion, [i], batch_size=1, **kw)[0] for i in range(n)])
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)
    assert torch.equal(never_hits, plain)
