"""Timing of several implementations side by side: interleaved rounds, medians of per-round ratios.

Shared by the benchmark harness (``benchmarks/``) and the GPU self-test
(``python -m routedlora.selftest``), so that both measure the same way (DESIGN.md §2).

On a shared, noisy machine the time of one implementation measured after another's says
little: the load changes in between. So every implementation runs once per *round*, the
order rotating from round to round, and a comparison is the median over rounds of the
ratio of the two times measured in the same round, with its spread (the quartiles of
those ratios). A round runs each implementation ``inner`` times back to back, ``inner``
chosen once so that each sample lasts at least ``min_sample_s``.

On a GPU each sample is timed with CUDA events; on the CPU with the host clock, and the
harness pins the thread count (default 1) so that peers do not fight over cores.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Milliseconds per call of ``inner`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def quartiles(values: List[float]) -> tuple:
    """(lower quartile, median, upper quartile)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


class Interleaved:
    """Per-round times of named implementations, measured round-robin in rotated order."""

    def __init__(self, times: Dict[str, List[float]], inner: Dict[str, int]):
        self.times, self.inner = times, inner

    @property
    def rounds(self) -> int:
        return min((len(t) for t in self.times.values()), default=0)

    def stats(self, name: str) -> dict:
        t = self.times[name]
        lo, med, hi = quartiles(t)
        return {"median_ms": med, "q1_ms": lo, "q3_ms": hi, "min_ms": min(t), "max_ms": max(t), "runs": len(t),
                "inner": self.inner[name]}

    def ratio(self, name: str, ref: str) -> Optional[dict]:
        """Median and quartiles over rounds of ``t[name] / t[ref]`` (same-round pairs)."""
        if name not in self.times or ref not in self.times:
            return None
        r = [a / b for a, b in zip(self.times[name], self.times[ref]) if b > 0]
        if not r:
            return None
        lo, med, hi = quartiles(r)
        return {"median": med, "q1": lo, "q3": hi}


def interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, *, rounds: int, warmup: int = 1,
                min_sample_s: float = 0.01, max_seconds: float = 30.0) -> Interleaved:
    """Time every callable of ``fns`` once per round, rounds rotating the order.

    Stops early after ``max_seconds`` of timed rounds (at least 3 rounds are kept when
    possible). An implementation that raises is dropped and its error re-raised at the end
    only if every implementation failed.
    """
    names = list(fns)
    for name in names:
        for _ in range(max(warmup, 1)):
            fns[name]()
    _sync(device)
    inner = {}
    for name in names:
        first = _sample(fns[name], device, 1)
        inner[name] = max(1, min(1000, math.ceil(min_sample_s * 1e3 / max(first, 1e-6))))
    times: Dict[str, List[float]] = {n: [] for n in names}
    t_start = time.perf_counter()
    for k in range(rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            times[name].append(_sample(fns[name], device, inner[name]))
        if time.perf_counter() - t_start > max_seconds and k + 1 >= min(3, rounds):
            break
    return Interleaved(times, inner)


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


def matmul_gflops(device: torch.device, dtype=torch.float32, n: int = 512, seconds: float = 0.3) -> float:
    """Achieved GFLOP/s of an ``n``-cube matmul here and now: the sanity line of a run.

    A loaded or throttled machine shows up as a low number; compare it between runs
    before comparing anything else.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
        if device.type == "cuda" and calls % 16 == 0:
            _sync(device)
    _sync(device)
    return 2 * n ** 3 * calls / (time.perf_counter() - t0) / 1e9
