"""Cost metrics: checkpoint bytes, GMACs by part, peak activation memory, timing statistics and the machine's limits.

Timings are never asserted against a clock here (the CI machine is shared); only their structure is.
"""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from fastdit.metrics.cost import (
    Timing, describe_device, gmacs_breakdown, machine_peak, model_size_bytes, peak_memory_bytes, speedup, time_fn,
    time_interleaved,
)
from fastdit.metrics.flops import count_gmacs, example_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MiB = 1 << 20


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -----------------------------------------------------------------------------
# model_size_bytes

def test_model_size_is_the_parameters_plus_a_small_container_overhead():
    model = nn.Linear(256, 256)
    size = model_size_bytes(model)
    assert param_bytes(model) <= size < param_bytes(model) + 4096


def test_model_size_counts_the_pruning_mask():
    model = nn.Linear(256, 256)
    dense = model_size_bytes(model)
    prune.l1_unstructured(model, "weight", amount=0.5)
    # weight_orig + weight_mask (a float mask as large as the weight) replace weight: the checkpoint grows.
    assert model_size_bytes(model) >= dense + model.weight_mask.numel() * 4
    prune.remove(model, "weight")
    assert model_size_bytes(model) < dense + 4096


def test_model_size_counts_int8_tensors_at_one_byte():
    model = nn.Linear(16, 16)
    before = model_size_bytes(model)
    model.register_buffer("weight_int8", torch.ones(1 << 16, dtype=torch.int8))
    assert (1 << 16) <= model_size_bytes(model) - before < (1 << 16) + 4096


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*quantize.*deprecated:UserWarning")
def test_model_size_of_a_quantized_model_is_about_a_quarter():
    model = nn.Sequential(nn.Linear(256, 256))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert model_size_bytes(quantized) < 0.3 * model_size_bytes(model)


# -----------------------------------------------------------------------------
# gmacs_breakdown

@pytest.mark.parametrize("batch_size", [1, 2])
def test_gmacs_breakdown_matches_the_dit_block_formulas(tiny_dit, batch_size):
    model = tiny_dit("DiT-XS/4", input_size=16)  # 16 tokens of width 256, depth 2
    T, d, depth = 16, 256, 2
    macs = {k: round(v * 1e9) for k, v in gmacs_breakdown(model, batch_size).items()}
    # qkv 3Td^2 + proj Td^2 + SDPA (q k^T and p v) 2T^2 d; MLP fc1 + fc2 at ratio 4: 8Td^2
    assert macs["attention"] == batch_size * depth * (4 * T * d ** 2 + 2 * T ** 2 * d)
    assert macs["mlp"] == batch_size * depth * 8 * T * d ** 2
    assert macs["attention"] + macs["mlp"] + macs["other"] == macs["total"]
    assert macs["other"] > 0  # embedders, adaLN, LayerNorms, final layer
    assert macs["total"] == round(count_gmacs(model, batch_size) * 1e9)


@pytest.mark.parametrize("training", [True, False])
def test_gmacs_breakdown_restores_the_training_flag(tiny_dit, training):
    model = tiny_dit().train(training)
    gmacs_breakdown(model)
    assert model.training is training


# -----------------------------------------------------------------------------
# peak_memory_bytes (CPU through the profiler's allocation records)

def test_peak_memory_sees_a_single_allocation():
    assert peak_memory_bytes(lambda: torch.empty(1 << 20), "cpu") >= 4 * MiB


def test_peak_memory_is_a_running_peak_not_a_sum():
    def churn():
        for _ in range(4):
            torch.empty(1 << 20)  # 4 MiB, freed before the next one
    assert 4 * MiB <= peak_memory_bytes(churn, "cpu") < 8 * MiB


def test_peak_memory_of_a_forward_grows_with_batch_and_excludes_weights(tiny_dit):
    model = tiny_dit()
    peaks = {}
    for batch in (1, 8):
        inputs = example_inputs(model, batch)
        with torch.no_grad():
            peaks[batch] = peak_memory_bytes(lambda: model(*inputs), "cpu")
    assert 0 < peaks[1] < peaks[8]
    assert peaks[1] < param_bytes(model)  # a batch-1 forward of this model needs far less than its weights


@needs_cuda
def test_peak_memory_cuda():
    held = torch.empty(1 << 22, device="cuda")  # allocated before: must not count
    assert 4 * MiB <= peak_memory_bytes(lambda: torch.empty(1 << 20, device="cuda"), "cuda") < 16 * MiB
    del held


# -----------------------------------------------------------------------------
# timing

def test_timing_statistics():
    t = Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median_s, t.iqr_s, t.mean_s, t.min_s, t.rounds) == (3.0, 2.0, 3.0, 1.0, 5)
    assert t.stdev_s == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1))
    assert t.per_second(6) == 2.0


def test_time_fn_warms_up_then_times_rounds_and_restores_threads():
    calls, seen_threads = [], []
    threads_before = torch.get_num_threads()
    x = torch.randn(64, 64)

    def fn():
        calls.append(1)
        seen_threads.append(torch.get_num_threads())
        return x @ x
    t = time_fn(fn, device="cpu", warmup=2, rounds=5, threads=1)
    assert len(calls) == 2 + 5 and t.rounds == len(t.samples) == 5
    assert set(seen_threads) == {1} and torch.get_num_threads() == threads_before
    assert 0 < t.min_s <= t.median_s and t.iqr_s >= 0 and t.stdev_s >= 0 and math.isfinite(t.per_second())


def test_time_fn_runs_until_min_time():
    t = time_fn(lambda: time.sleep(0.002), device="cpu", warmup=0, rounds=2, min_time_s=0.03)
    assert t.rounds >= 2 and sum(t.samples) >= 0.03


def test_time_interleaved_alternates_variants_every_round():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timings = time_interleaved(fns, device="cpu", warmup=1, rounds=6)
    assert list(timings) == ["a", "b", "c"] and all(t.rounds == 6 for t in timings.values())
    timed = order[3:]
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every variant once per round
    assert {r[0] for r in rounds} == {"a", "b", "c"}  # and no variant always goes first


def test_speedup_of_identical_samples_is_one():
    samples = list(np.random.default_rng(1).normal(1.0, 0.05, 30))
    s = speedup(Timing.from_samples(samples), Timing.from_samples(samples))
    assert s["ratio"] == 1.0 and s["ci_low"] <= 1.0 <= s["ci_high"] and s["p_value"] > 0.5


def test_speedup_detects_a_twice_slower_candidate():
    rng = np.random.default_rng(2)
    reference = Timing.from_samples(rng.normal(1.0, 0.05, 30))
    candidate = Timing.from_samples(2 * rng.normal(1.0, 0.05, 30))
    s = speedup(reference, candidate)
    assert s["ratio"] == pytest.approx(0.5, rel=0.1)
    assert s["ci_low"] <= s["ratio"] <= s["ci_high"] < 1.0
    assert s["p_value"] < 1e-6


def test_speedup_is_reproducible_with_a_seed():
    rng = np.random.default_rng(3)
    a, b = Timing.from_samples(rng.random(20)), Timing.from_samples(rng.random(20))
    assert speedup(a, b, seed=7) == speedup(a, b, seed=7)


@needs_cuda
def test_time_fn_cuda():
    x = torch.randn(512, 512, device="cuda")
    t = time_fn(lambda: x @ x, device="cuda", warmup=2, rounds=5)
    assert t.rounds == 5 and 0 < t.min_s <= t.median_s


# -----------------------------------------------------------------------------
# the machine

def test_machine_peak_cpu():
    peak = machine_peak("cpu", size=128, seconds=0.2)
    assert 0 < peak["matmul_gflops"] < math.inf and 0 < peak["memory_gbps"] < math.inf
    assert peak["threads"] == torch.get_num_threads() and peak["device"]
    assert "matmul_bf16_gflops" not in peak


def test_describe_device_cpu():
    d = describe_device("cpu")
    assert d["device"] == "cpu" and d["name"] and d["threads"] == torch.get_num_threads()
    assert d["torch"] == torch.__version__
    assert d["cuda"] is None and d["capability"] is None and d["gpu_memory_gb"] is None


@needs_cuda
def test_machine_peak_and_describe_device_cuda():
    peak = machine_peak("cuda", size=1024, seconds=0.5)
    assert peak["matmul_gflops"] > 0 and peak["matmul_bf16_gflops"] > 0 and peak["memory_gbps"] > 0
    d = describe_device("cuda")
    assert d["device"] == "cuda" and d["cuda"] == torch.version.cuda and d["gpu_memory_gb"] > 0
    assert d["capability"] == "{}.{}".format(*torch.cuda.get_device_capability())


def test_forward_throughput_in_both_modes(tiny_dit):
    from fastdit.metrics.cost import forward_throughput
    model = tiny_dit(input_size=8, in_channels=1, num_classes=10)
    eager = forward_throughput(model, batch_size=4, device="cpu", rounds=3, threads=1)
    assert eager["forwards_per_s"] > 0 and eager["images_per_s"] == pytest.approx(4 * eager["forwards_per_s"])
    assert eager["timing"].rounds == 3
    compiled = forward_throughput(model, batch_size=4, device="cpu", mode="compile", warmup=1, rounds=2, threads=1)
    assert compiled["mode"] == "compile" and compiled["forwards_per_s"] > 0
    with pytest.raises(ValueError, match="execution mode"):
        forward_throughput(model, device="cpu", mode="jit")


def test_the_sampling_workload_runs_the_full_chain(tiny_dit):
    """The bench times full-chain sampling through harness.worker.workload: every step, every sample of the batch."""
    from fastdit.harness.worker import workload
    model = tiny_dit(input_size=8, in_channels=1, num_classes=10)
    calls = []
    model.final_layer.register_forward_hook(lambda *_: calls.append(1))
    run = workload(model, dict(call="sample", batch_size=5, steps=3, options=dict(sampler="ddim")), "cpu")
    x0, labels = run()
    assert x0.shape == (5, 1, 8, 8) and labels.shape == (5,) and len(calls) == 3
    timing = time_interleaved({"sampling": run}, device="cpu", warmup=0, rounds=2, threads=1)["sampling"]
    assert timing.rounds == 2 and timing.median_s > 0


@pytest.mark.parametrize("variant", ["DiT-S/2", "DiT-XS/4"])
def test_dispatched_macs_count_what_runs_and_agree_with_fvcore(variant):
    import copy

    from fastdit.metrics.flops import count_gmacs, dispatched_gmacs, example_inputs
    from fastdit.models import create_model
    from fastdit.techniques import parse, apply
    model = create_model(variant, depth=2).eval()
    x, t, y = example_inputs(model, 2, "cpu")
    with torch.no_grad():
        counted = dispatched_gmacs(lambda: model(x, t, y))
        twice = dispatched_gmacs(lambda: (model(x, t, y), model(x, t, y)))
        int8 = apply(copy.deepcopy(model), parse("quantize:scheme=int8-dynamic-cpu"))
        quantized = dispatched_gmacs(lambda: int8(x, t, y))
    assert counted == pytest.approx(count_gmacs(model, 2), rel=5e-3)  # attention's fused CPU kernel counted too
    assert twice == pytest.approx(2 * counted)
    assert quantized == pytest.approx(counted)  # the dynamic int8 Linear counts as the Linear it replaces


def test_a_bfloat16_model_runs_end_to_end_in_bfloat16_and_fp32_models_are_left_alone(tiny_dit):
    """harness.worker.in_dtype: weights, buffers, inputs and the timestep embedding all in bf16, close to fp32."""
    from fastdit.harness.worker import in_dtype, workload
    model = tiny_dit()
    assert in_dtype(model, "float32") is model and not model.t_embedder.mlp._forward_pre_hooks
    reference = workload(model, dict(call="forward", batch_size=3), "cpu")()
    bf16 = in_dtype(tiny_dit(), "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert example_inputs(bf16, 3)[0].dtype == torch.bfloat16
    out = workload(bf16, dict(call="forward", batch_size=3), "cpu")()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_the_forward_workload_runs_compiled_and_refuses_cuda_graphs_without_cuda(tiny_dit):
    from fastdit.harness.worker import workload
    model = tiny_dit()
    eager = workload(model, dict(call="forward", batch_size=2, mode="eager"), "cpu")()
    compiled = workload(model, dict(call="forward", batch_size=2, mode="compile"), "cpu")()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        workload(model, dict(call="forward", batch_size=2, mode="cuda-graphs"), "cpu")
    with pytest.raises(ValueError, match="unknown forward mode 'graphs'"):
        workload(model, dict(call="forward", batch_size=2, mode="graphs"), "cpu")


@needs_cuda
def test_a_cuda_graph_replays_the_eager_forward(tiny_dit):
    from fastdit.harness.worker import workload
    model = tiny_dit().cuda()
    eager = workload(model, dict(call="forward", batch_size=2), "cuda")()
    replay = workload(model, dict(call="forward", batch_size=2, mode="cuda-graphs"), "cuda")
    torch.testing.assert_close(replay(), eager)
    torch.testing.assert_close(replay(), eager)  # every replay, on the same captured inputs
