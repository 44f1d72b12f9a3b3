"""What a model costs to store and run: bytes on disk, GMACs by part, peak activation memory, and honest timings.

Sizes come from torch.save, never from .nbytes: quantized tensor subclasses report their fp32 size there, and pruning
masks are extra state that a parameter count misses. Timings are medians of many rounds with their spread; speed
ratios come from variants timed interleaved in one process, with a bootstrap CI and a rank test, so that a ratio is
reported with the evidence for it. machine_peak measures what this machine can do at best (matmul rate, copy
bandwidth), so that every throughput can be read as a fraction of that limit.

A pruned model whose weights are zeroed rather than removed is stored sparse: sparse_state_dict keeps each Linear
weight in whichever of dense and CSR is smaller, and sparse_size_bytes is what that file costs.
"""
from __future__ import annotations

import io
import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import mannwhitneyu

from .flops import analyze, example_inputs
# The measuring primitives live in a module of their own (torch and the standard library only), so that a process
# running another revision's code measures with exactly these; they are part of this module's API too.
from .measure import CPU_MEMORY_DEVICES, is_cuda, num_threads, peak_memory_bytes, timed_call  # noqa: F401

# A DiT block's sub-layers as fvcore's by_module names them. Anchored on `blocks.i.` because the timestep embedder
# also has a child called `mlp` (t_embedder.mlp), which is embedding work, not a transformer MLP.
BLOCK_PART = re.compile(r"blocks\.\d+\.(attn|mlp)")

# Copy-bandwidth buffer: 128 MiB each for source and destination, well beyond CPU L3 and GPU L2 (50 MB on H100), so the
# copy streams through DRAM/HBM instead of cache.
COPY_BYTES = 1 << 27


# -----------------------------------------------------------------------------
# size and GMACs

def model_size_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()): what a checkpoint really costs, whatever the tensors claim."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def gmacs_breakdown(model: nn.Module, batch_size: int = 1) -> dict[str, float]:
    """GMACs of one forward, split into transformer attention, transformer MLP and everything else.

    by_module counts are inclusive (blocks.0.attn already holds its qkv, proj and SDPA), so only the block-level
    modules are summed. "other" is the remainder: embedders, adaLN projections, LayerNorms and the final layer.
    """
    by_module = analyze(model, batch_size).by_module()
    macs = {"attention": 0, "mlp": 0}
    for name, count in by_module.items():
        part = BLOCK_PART.fullmatch(name)
        if part:
            macs["attention" if part.group(1) == "attn" else "mlp"] += count
    total = by_module[""]
    # Split in integer MACs before converting, so the three parts add up to the total.
    return {"total": total / 1e9, "attention": macs["attention"] / 1e9, "mlp": macs["mlp"] / 1e9,
            "other": (total - macs["attention"] - macs["mlp"]) / 1e9}


# -----------------------------------------------------------------------------
# sparse storage

def sparse_state_dict(model: nn.Module) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """The state dict with every 2-D Linear weight stored in whichever of dense and CSR is smaller. CSR keeps row
    pointers (int32), column indices (int16 when the width allows, else int32) and the nonzero values; it pays 6
    bytes per nonzero against 4 per dense entry, so it wins beyond a third of zeros."""
    out = {}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        if name in linear and t.dim() == 2:
            nonzero = t != 0                                                    # (out, in)
            col_dtype = torch.int16 if t.shape[1] - 1 <= torch.iinfo(torch.int16).max else torch.int32
            crow = torch.cat([torch.zeros(1, dtype=torch.int64), nonzero.sum(1).cumsum(0)])  # (out + 1,)
            entry = dict(shape=torch.tensor(t.shape), crow=crow.to(torch.int32),
                         col=nonzero.nonzero()[:, 1].to(col_dtype), values=t[nonzero])  # row-major order
            csr_bytes = sum(v.numel() * v.element_size() for v in entry.values())
            if csr_bytes < t.numel() * t.element_size():
                out[name] = entry
                continue
        out[name] = t
    return out


def dense_state_dict(sparse: Mapping[str, torch.Tensor | dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of sparse_state_dict: a plain state dict that load_state_dict (after models.restructure) accepts."""
    out = {}
    for name, v in sparse.items():
        if isinstance(v, dict):
            shape = tuple(v["shape"].tolist())
            rows = torch.repeat_interleave(torch.arange(shape[0]), v["crow"].long().diff())  # row of each value
            dense = torch.zeros(shape, dtype=v["values"].dtype)
            dense[rows, v["col"].long()] = v["values"]
            out[name] = dense
        else:
            out[name] = v
    return out


def sparse_size_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(sparse_state_dict(model)): the checkpoint size of the sparse storage format."""
    buffer = io.BytesIO()
    torch.save(sparse_state_dict(model), buffer)
    return buffer.getbuffer().nbytes


# -----------------------------------------------------------------------------
# timing

@dataclass
class Timing:
    """Seconds per call over `rounds` timed calls; median and IQR are the numbers to report, the rest is context."""
    median_s: float
    iqr_s: float
    mean_s: float
    stdev_s: float
    min_s: float
    rounds: int
    samples: list[float]

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        s = np.asarray(samples, dtype=np.float64)
        q1, median, q3 = np.percentile(s, [25, 50, 75])
        return cls(median_s=float(median), iqr_s=float(q3 - q1), mean_s=float(s.mean()),
                   stdev_s=float(s.std(ddof=1)) if len(s) > 1 else 0.0, min_s=float(s.min()), rounds=len(s),
                   samples=[float(x) for x in s])

    def per_second(self, items: int = 1) -> float:
        return items / self.median_s


def time_fn(fn: Callable[[], Any], *, device: str, warmup: int = 3, rounds: int = 20, min_time_s: float = 0.0,
            threads: int | None = None) -> Timing:
    """Time fn() after `warmup` untimed calls (compilation, autotuning, caches), for at least `rounds` calls and
    until the timed calls add up to min_time_s."""
    with num_threads(threads):
        for _ in range(warmup):
            fn()
        samples = []
        while len(samples) < rounds or sum(samples) < min_time_s:
            samples.append(timed_call(fn, device))
    return Timing.from_samples(samples)


class SelfTimed:
    """A variant of time_interleaved that times itself somewhere else (the base revision's worker process): calling
    run() performs one call there and returns its seconds, so the transport is never inside the timing."""

    def __init__(self, run: Callable[[], float]):
        self.run = run


def _one_round(fn, device):
    return fn.run() if isinstance(fn, SelfTimed) else timed_call(fn, device)


def time_interleaved(fns: Mapping[str, Callable[[], Any] | SelfTimed], *, device: str, warmup: int = 3,
                     rounds: int = 20, threads: int | None = None) -> dict[str, Timing]:
    """Time several variants round by round, so that drift in clock speed or background load hits every variant
    alike; speed ratios are computed from these. Each round calls every variant once, starting one variant further
    on each round (a b, b a, ... for two), so no variant always runs right after the same other one and inherits its
    cache state. Sample i of every variant comes from round i: the rounds pair them. A SelfTimed variant runs in
    another process, one call at a time, never beside the others."""
    names = list(fns)
    samples = {name: [] for name in names}
    with num_threads(threads):
        for _ in range(warmup):
            for name in names:
                _one_round(fns[name], device)
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                samples[name].append(_one_round(fns[name], device))
    return {name: Timing.from_samples(samples[name]) for name in names}


def prepare_mode(model: nn.Module, mode: str) -> Callable[..., Any]:
    """The model as it will run: "eager", or "compile" (torch.compile; its warm-up calls pay the compilation)."""
    if mode == "eager":
        return model
    if mode == "compile":
        return torch.compile(model)
    raise ValueError(f"unknown execution mode {mode!r}; use eager or compile")


def forward_throughput(model: nn.Module, batch_size: int = 1, *, device: str, mode: str = "eager", warmup: int = 3,
                       rounds: int = 20, threads: int | None = None) -> dict[str, Any]:
    """One denoising step: forwards/s (what arXiv 2509.17894 called "image/s" at batch 1) and images/s.

    Inputs are the seeded example_inputs; gradients are off (inference_mode).
    """
    runner = prepare_mode(model.eval(), mode)
    x, t, y = example_inputs(model, batch_size, device)
    with torch.inference_mode():
        timing = time_fn(lambda: runner(x, t, y), device=device, warmup=warmup, rounds=rounds, threads=threads)
    return dict(mode=mode, batch_size=batch_size, forwards_per_s=timing.per_second(),
                images_per_s=timing.per_second(batch_size), timing=timing)


def speedup(reference: Timing, candidate: Timing, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """How much faster `candidate` is than `reference` (ratio of medians, > 1 is faster), with a 95% bootstrap CI of
    that ratio and the two-sided Mann-Whitney U p-value that the two sample sets come from one distribution."""
    ref, cand = np.asarray(reference.samples), np.asarray(candidate.samples)
    rng = np.random.default_rng(seed)
    # Resample each variant independently: they were interleaved, not paired call by call.
    ref_medians = np.median(rng.choice(ref, size=(n_boot, len(ref))), axis=1)
    cand_medians = np.median(rng.choice(cand, size=(n_boot, len(cand))), axis=1)
    ci_low, ci_high = np.percentile(ref_medians / cand_medians, [2.5, 97.5])
    return {"ratio": reference.median_s / candidate.median_s, "ci_low": float(ci_low), "ci_high": float(ci_high),
            "p_value": float(mannwhitneyu(ref, cand, alternative="two-sided").pvalue)}


# -----------------------------------------------------------------------------
# the machine

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device) -> str:
    return torch.cuda.get_device_name(device) if is_cuda(device) else cpu_name()


def best_rate(fn: Callable[[], Any], work: float, device: str, seconds: float) -> float:
    """Highest `work` per second that fn achieves. Calls are batched into rounds of about seconds/10, because a single
    fast call (a 1024^3 matmul on a GPU) would mostly time the launch; the fastest round is the peak, slower rounds
    are interference from other jobs."""
    fn()
    one_call = timed_call(fn, device)
    calls = max(1, round(seconds / 10 / max(one_call, 1e-9)))

    def batch():
        for _ in range(calls):
            fn()
    timing = time_fn(batch, device=device, warmup=0, rounds=3, min_time_s=seconds)
    return work * calls / timing.min_s


def machine_peak(device: str, size: int = 1024, seconds: float = 1.0) -> dict[str, Any]:
    """Measured best matmul rate (GFLOP/s, 2*size^3 flops per matmul) and copy bandwidth (GB/s, bytes read + written)
    at the current thread count. fp32 on CUDA follows torch's TF32 setting (off by default), as a model would."""
    cuda = is_cuda(device)
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    share = seconds / (3 if cuda else 2)
    result = {"matmul_gflops": best_rate(lambda: a @ b, 2 * size ** 3, device, share) / 1e9}
    if cuda:
        a16, b16 = a.bfloat16(), b.bfloat16()
        result["matmul_bf16_gflops"] = best_rate(lambda: a16 @ b16, 2 * size ** 3, device, share) / 1e9
    # The source is written once (ones, not empty): untouched pages read as the shared zero page and would flatter
    # the bandwidth.
    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    result["memory_gbps"] = best_rate(lambda: dst.copy_(src), 2 * COPY_BYTES, device, share) / 1e9
    result["threads"] = torch.get_num_threads()
    result["device"] = device_name(device)
    return result


def describe_device(device: str | torch.device) -> dict[str, Any]:
    """A fingerprint of the machine a number was measured on; GPU memory in GiB (2^30 bytes)."""
    cuda = is_cuda(device)
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": torch.device(device).type,
        "name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda if cuda else None,
        "capability": f"{props.major}.{props.minor}" if cuda else None,
        "gpu_memory_gb": round(props.total_memory / 2 ** 30, 1) if cuda else None,
    }
