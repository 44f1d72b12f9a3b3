"""Samplers and step counts: how many network evaluations does an image need, at what quality?

The same trained zoo model sampled with each sampler at 10, 20 and 50 steps and at the profile's own count: fastdit's
DDPM (ancestral, the paper's protocol) and DDIM, and the ODE solvers DPM-Solver++ (2M) and UniPC (diffusers'
schedulers at their own default settings), all on DiT's linear 1,000-step schedule, plus DDPM at 250 steps, the
paper's protocol. Each row measures the whole chain against the profile's own chain (its sampler and steps: DDIM-25 on
the cpu profile) timed interleaved in this run:

    chain_speedup           images/s of this chain over the profile's chain (gated: the speed rule)
    evaluations_per_image   network evaluations per image: the step count, counted (gated, 5 %)
    gmacs_per_image         multiply-adds dispatched per image over the chain, counted by torch (gated, 5 %)
    chain_peak_memory_bytes peak memory of one chain above the weights: a multistep solver's history counts
    quality                 FID / sFID / KID / precision / recall under the profile's protocol with this chain, the
                            samples' fingerprint, and each metric's distance from the profile's chain (reported)
    sampler_overhead        the chain's time over `steps` forwards of the same batch, minus 1: the share the sampler's
                            own arithmetic adds, which is what lets a model-level technique's forward speedup stand
                            for its chain speedup on the report's axis (reported)

The profile's own chain is the reference row itself (bench/test_reference.py) and is not repeated.
"""
import diffusers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdit.diffusion import create_diffusion, linear_betas
from fastdit.harness.gate import Measurement
from fastdit.harness.worker import workload
from fastdit.metrics import cost
from fastdit.sampling import SAMPLERS, SOLVERS, generate, noise_generators

import test_reference  # the sibling bench module whose quality baselines the rows are set beside

SETTINGS = [(sampler, steps) for sampler in SAMPLERS for steps in (10, 20, 50, "profile")] + [("ddpm", 250)]
SETTING_ID = "{0[0]}-{0[1]}".format
QUICK = ["dpm-solver++-10"]
SWEEP_VARIANTS = "quick"  # every chain on the quick variants; the other variants take the QUICK ones (full tier)


def _chain(bench, setting):
    sampler, steps = setting
    steps = bench.profile.sampling_steps if steps == "profile" else steps
    if (sampler, steps) == (bench.profile.sampler, bench.profile.sampling_steps):
        pytest.skip("the profile's own chain is the reference row: bench/test_reference.py::test_quality")
    return sampler, steps


def test_chain(bench, variant, setting):
    """The zoo model with this chain: its speed against the profile's chain, what it computed, memory, quality."""
    sampler, steps = _chain(bench, setting)
    model = bench.reference_model(variant)
    protocol = bench.protocol(variant, sampler=sampler, steps=steps)
    info = {}
    measurements = bench.sampling_speed(model, protocol, reference=bench.reference_model(variant))
    measurements += bench.chain_counts(model, protocol)[:2]  # no cache here: its hit rate is 0 by construction
    evaluations = measurements[-2].value
    assert evaluations == steps, f"the chain ran {evaluations} network evaluations per image, not its {steps} steps"
    measurements.append(bench.chain_memory(model, protocol))
    measurements.append(_sampler_overhead(bench, model, protocol, steps))
    quality = bench.quality(model, protocol)
    measurements += quality + bench.against_reference(test_reference.test_quality, quality, variant, info)
    bench.check(measurements, **info)


def _sampler_overhead(bench, model, protocol, steps, rounds=5):
    """The chain's median time over `steps` forwards of its batch (timed interleaved), minus 1."""
    batch = bench.chain_batch()
    work = dict(call="sample", batch_size=batch, steps=steps, options=dict(
        sampler=protocol["sampler"], cfg_scale=bench.profile.cfg_scale, guided_channels=bench.profile.guided_channels,
        clip_denoised=bench.profile.clip_denoised))
    forward = workload(model, dict(call="forward", batch_size=batch), bench.device)
    fns = {"chain": workload(model, work, bench.device), "forwards": lambda: [forward() for _ in range(steps)]}
    timings = cost.time_interleaved(fns, device=bench.device, warmup=1, rounds=rounds, threads=1)
    share = timings["chain"].median_s / timings["forwards"].median_s - 1
    return Measurement.reported("sampler_overhead", round(share, 4), "of the forwards", "lower",
                                dict(protocol, batch_size=batch, threads=1))


# --------------------------------------------------------------------------------------------- invariants

@settings(deadline=None, max_examples=6)
@given(sampler=st.sampled_from(sorted(SOLVERS)), steps=st.sampled_from([5, 10, 20]), n=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16), clip=st.booleans())
def test_invariants(bench_session, variant, sampler, steps, n, seed, clip):
    """On the trained model: each solver at its own default settings gives exactly what diffusers' scheduler loop gives
    (fastdit only adds the per-sample seeding and the epsilon split), draws no noise after x_T, and sample i is the
    same alone as in its batch (up to the float rounding of other batch shapes)."""
    model = bench_session.reference_model(variant, device="cpu")
    p = bench_session.profile
    diffusion = create_diffusion(steps, num_timesteps=p.num_timesteps, learn_sigma=model.learn_sigma)
    x, labels = generate(model, diffusion, range(n), seed=seed, sampler=sampler, clip_denoised=clip, batch_size=n)
    gens = noise_generators(seed, range(n))
    x_T = torch.stack([torch.randn((model.in_channels, model.input_size, model.input_size), generator=g)
                       for g in gens])
    # diffusers' own loop: set_timesteps, then the model and scheduler.step at each of its timesteps
    scheduler = getattr(diffusers, SOLVERS[sampler])(num_train_timesteps=p.num_timesteps, thresholding=clip,
                                                      trained_betas=linear_betas(p.num_timesteps), sample_max_value=1.0)
    scheduler.set_timesteps(steps)
    want = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(scheduler.scale_model_input(want, t), t.expand(n), labels)[:, :model.in_channels]
            want = scheduler.step(eps, t, want).prev_sample
    assert torch.equal(x, want)
    alone = torch.cat([generate(model, diffusion, [i], seed=seed, sampler=sampler, clip_denoised=clip)[0]
                       for i in range(n)])
    torch.testing.assert_close(alone, x, rtol=1e-4, atol=1e-4)
