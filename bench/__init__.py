"""Benchmarks: the table runner (`python -m bench.run`) and one `bench_<family>.py` per op family.

The timer lives here so that the table runner and every family time things the same way.
"""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gpu_times(fn, warmup: int, reps: int) -> list[float]:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:  # flushes L2 between calls, times each call with CUDA events
        try:
            return list(do_bench(fn, return_mode="all"))
        except AssertionError:  # triton < 3.2 has no return_mode="all"
            return [float(do_bench(fn, return_mode="median"))]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_ms(fn, device: str, *, warmup: int = 2, min_reps: int = 7, min_seconds: float = 1.0) -> dict:
    """{'ms': median, 'ms_min': fastest call, 'reps': calls timed} for `fn()`, in milliseconds.

    The median is the number the table reports; the minimum is kept beside it because on a
    shared CPU a preempted thread stalls a whole parallel region, and a median far above the
    minimum says the run was disturbed. CPU: perf_counter around each call, at least
    `min_reps` calls and `min_seconds` in total, after `warmup` calls that absorb first-touch
    page faults and allocator growth.
    """
    if device == "cuda":
        times = _gpu_times(fn, max(warmup, 5), max(min_reps, 25))
    else:
        for _ in range(warmup):
            fn()
        times = []
        began = time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - began < min_seconds:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "reps": len(times)}
