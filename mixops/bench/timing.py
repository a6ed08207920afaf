"""Median wall time of a callable on CUDA (events) or CPU (perf_counter)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


# Larger than the L2 cache of any current GPU (50 MB on H100, 60 MB on H200 is the next size).
_FLUSH_BYTES = 256 * 2**20


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, rep: int) -> float:
    """Median time of one call of ``fn`` in milliseconds, after ``warmup`` untimed calls.

    On CUDA the L2 cache is flushed (a buffer larger than it is zeroed) before every timed
    call, outside the timed region, so the inputs come from HBM: the GB/s column is then
    comparable with the copy-bandwidth ceiling.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for s, e in zip(starts, ends):
            flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated during one call, above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
