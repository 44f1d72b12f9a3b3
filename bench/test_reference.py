"""The unoptimized reference: the profile's trained zoo, and the paper's four variants at paper scale.

Paper scale (DiT-S/2, S/4, XS/2, XS/4 at 32x32x4 with 200 classes, arXiv 2509.17894's setup) needs no trained weights:
parameters and GMACs must equal the paper's, and size, peak memory and speed are measured on any machine. The zoo
rows (the profile's trained models) add sample quality and the sampler's invariants. Every technique's speedup is
measured against these models in its own test; here speed is measured against a matmul yardstick.
"""
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastdit.harness.worker import MODES
from fastdit.metrics.cost import gmacs_breakdown
from fastdit.metrics.flops import count_gmacs, count_params, example_inputs
from fastdit.metrics.measure import is_cuda

PAPER = json.loads((Path(__file__).parents[1] / "baselines" / "paper.json").read_text())["variants"]


# ------------------------------------------------------------------------------------------------- paper scale

@pytest.mark.parametrize("name", list(PAPER))
def test_paper_cost(bench, name):
    model = bench.paper_model(name)
    # The paper's own figures: a cross-check of the model definition, independent of any stored baseline.
    assert count_params(model) == PAPER[name]["params"]
    assert round(count_gmacs(model), 3) == PAPER[name]["gmacs"]
    bench.check(bench.cost(model, bench.protocol(name, scale="paper"), batch_size=8))


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_forward(bench, name, benchmark):
    model = bench.paper_model(name)
    x, t, y = example_inputs(model, batch_size=1, device=bench.device)
    bench.machine_peak()  # this machine's limits, once per process, for the report
    # pytest-benchmark's own timing of the batch-1 forward (its JSON and `pytest-benchmark compare` keep working;
    # it is disabled under xdist), then the gated efficiency against the interleaved yardstick.
    with torch.inference_mode(), torch.no_grad():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = benchmark.pedantic(model, args=(x, t, y), rounds=5, warmup_rounds=1)
        finally:
            torch.set_num_threads(threads)
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()
    benchmark.extra_info.update(variant=name, gmacs=PAPER[name]["gmacs"],
                                paper_forwards_per_s=PAPER[name]["batch1_forwards_per_s"])
    flops = 2e9 * count_gmacs(model)
    bench.check(bench.efficiency(model, dict(call="forward", batch_size=1), flops,
                                 bench.protocol(name, scale="paper", batch_size=1)))


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_paper_block_parts(bench, part):
    """One block's attention and MLP of DiT-S/2 (256 tokens, width 384), each timed against the yardstick: a
    slowdown inside one sub-layer shows here at full size instead of diluted in the whole forward."""
    model = bench.paper_model("DiT-S/2")
    flops = 2e9 * gmacs_breakdown(model)[part] / len(model.blocks)
    bench.check(bench.efficiency(model, dict(call="block", part=part), flops,
                                 bench.protocol("DiT-S/2", scale="paper", part=part, batch_size=1),
                                 name=part, rounds=30))


@pytest.mark.bench_full
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(PAPER))
def test_paper_throughput(bench, name, mode, throughput_batch):
    """Forwards/s of the paper's four variants at each of the profile's throughput batches, in its throughput
    dtype, run eager, compiled (torch.compile) and replayed as a CUDA graph (explicit capture: at batch 1 the
    forward is launch-bound, and one graph launch replaces hundreds of kernel launches); compiled and graphed rows
    carry their speedup over eager timed interleaved. The paper's batch-1 figure (fp32, eager) is in baselines/
    paper.json beside it."""
    if mode == "cuda-graphs" and not is_cuda(bench.device):
        pytest.skip("CUDA graphs need a CUDA device")
    dtype = bench.profile.throughput_dtype
    model = bench.paper_model(name, dtype=dtype)
    with torch.inference_mode():
        out = model(*example_inputs(model, batch_size=1, device=bench.device))
    assert out.dtype == getattr(torch, dtype) and torch.isfinite(out).all(), f"the {dtype} forward is not finite"
    protocol = bench.protocol(name, scale="paper", dtype=dtype)
    bench.check(bench.throughput(model, protocol, batch_size=throughput_batch, mode=mode),
                paper_forwards_per_s=PAPER[name]["batch1_forwards_per_s"])


# ---------------------------------------------------------------------------------------------------- the zoo

def test_quality(bench, variant):
    """FID, sFID, KID and precision/recall of the profile's samples; every sampling pass checks that the sampler
    ran exactly the protocol's number of denoising steps (Bench.samples)."""
    model = bench.reference_model(variant)
    bench.check(bench.quality(model, bench.protocol(variant)))


def test_cost(bench, variant):
    model = bench.reference_model(variant)
    batch = bench.profile.throughput_batch_sizes[-1]
    bench.check(bench.cost(model, bench.protocol(variant), batch_size=batch))


def test_speed(bench, variant):
    """The forward at the profile's largest throughput batch against the yardstick, and full-chain sampling."""
    model = bench.reference_model(variant)
    batch = bench.profile.throughput_batch_sizes[-1]
    flops = 2e9 * count_gmacs(model) * batch
    protocol = bench.protocol(variant, batch_size=batch)
    measurements = bench.efficiency(model, dict(call="forward", batch_size=batch), flops, protocol)
    bench.check(measurements + bench.sampling_speed(model, protocol))


@given(batch=st.integers(1, 4), seed=st.integers(0, 2 ** 16), label_dropout=st.booleans())
def test_forward_invariants(bench_session, variant, batch, seed, label_dropout):
    """Shape and finiteness for any timesteps and labels (the null class included), and each sample's output is
    independent of the rest of its batch."""
    model = bench_session.reference_model(variant, device="cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.y_embedder.embedding_table.num_embeddings if label_dropout else model.num_classes,
                      (batch,), generator=g)
    with torch.no_grad():
        out = model(x, t, y)
        alone = model(x[:1], t[:1], y[:1])
    assert out.shape == (batch, model.out_channels, model.input_size, model.input_size)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], alone, rtol=1e-4, atol=1e-5)
