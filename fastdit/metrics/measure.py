"""Measuring primitives: one timed call, the peak memory of one call, pinned threads.

Standard library and torch only, on purpose: a base-revision worker (fastdit.harness.worker) loads this file by path,
so that the base's code is measured with exactly the head's instruments, whatever the base's own fastdit contains.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# Device types whose allocations are host memory (oneDNN/ideep buffers live on the CPU heap too), as torch's own
# profiler tables count them.
CPU_MEMORY_DEVICES = {torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.MKLDNN,
                      torch.autograd.DeviceType.IDEEP}


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def peak_memory_bytes(fn: Callable[[], Any], device: str | torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated before it: activations count, weights do not."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    # The CPU allocator keeps no peak statistic, and RSS sees neither freed-and-reused blocks nor the line between
    # weights and activations. The profiler records every allocation (+bytes) and free (-bytes) of torch's CPU
    # allocator; the running sum of those records in time order is the allocated memory above the starting point.
    # The raw records are read, not prof.events(): those fold each op's allocations into one net number per op,
    # which hides the workspace an op allocates and frees inside itself (attention's scratch buffers).
    # acc_events=True only silences the "clears events at the end of each cycle" warning of torch 2.11 (one cycle here).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() in CPU_MEMORY_DEVICES]
    allocated = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        allocated += record.nbytes()
        peak = max(peak, allocated)
    return peak


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads for the duration (None: leave them), and restore the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timed_call(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Seconds of one fn() call. On CUDA, host timers would measure only the kernel launches, so the call is
    bracketed by CUDA events after a synchronize (no earlier work is inside the window) and read after the end event."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def same_cores(threads: int) -> list[int] | None:
    """The CPU cores on which both sides of a head-versus-base comparison run (None: no pinning, as on CUDA): the
    first `threads` cores this process may use, offset by the xdist worker's number, so that two comparisons running
    side by side do not share a core, while the head and its base, which take turns, always do. Two processes left
    to the scheduler sit on different cores of a virtual machine, whose speeds differ by several percent."""
    import os
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    start = int(worker[2:]) * threads if worker[2:].isdigit() else 0
    return [allowed[(start + i) % len(allowed)] for i in range(threads)]


@contextmanager
def pinned(cores: Sequence[int] | None) -> Iterator[None]:
    """Run the calling thread on `cores` for the duration (None: leave it), and restore its previous affinity. With
    one intra-op thread, the calling thread is the one that computes."""
    import os
    if cores is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def settle_heap() -> None:
    """Make this process allocate like a long-running one, so that two processes compared with each other (the head
    and the base's worker) allocate alike. glibc serves a large block with its own mmap until a freed mmapped block
    raises that threshold; a young process pays page faults for activations that an old one takes from its heap.
    Unchanged pruned DiT-mS/4 forwards ran 6-16 % slower in a fresh worker than in the process that had run the
    bench, and 4-17 % faster once only the worker had been settled. Freeing one 30 MiB block (glibc's largest
    dynamic threshold is 32 MiB) moves the threshold past every activation of the CPU profiles."""
    block = bytearray(30 << 20)
    del block
