"""Timing and memory of one callable: device events on a GPU, a host clock on the CPU."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int,
            max_seconds: float = 10.0) -> Dict[str, float]:
    """Median, min and max milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs.

    Stops early once ``max_seconds`` of timed runs have passed (slow peers at large
    sizes), reporting how many runs it took.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    spent = 0.0
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
        if spent > max_seconds:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": len(times)}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Extra device memory at the peak of one ``fn()`` over what was allocated before (GPU only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
