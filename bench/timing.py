"""How one callable is timed: median and p20 / p80 in milliseconds, on CUDA or on CPU.

CUDA: `triton.testing.do_bench(..., return_mode="all")` (it warms up, clears the L2 cache between calls and times
each call with CUDA events), or, without triton, CUDA events around each call with the same L2 clearing.
CPU: `torch.utils.benchmark.Timer.blocked_autorange` with the thread count fixed; the quantiles are taken over
its blocks (each block's time is already an average over many calls).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    times_ms: tuple[float, ...]  # the measurements the quantiles were taken over

    @property
    def samples(self) -> int:
        return len(self.times_ms)

    @classmethod
    def from_times(cls, times_ms) -> "Timing":
        times = tuple(float(t) for t in times_ms)
        if not times:
            raise ValueError("no measurements")
        return cls(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), times)

    @classmethod
    def pooled(cls, timings: "list[Timing]") -> "Timing":
        """One Timing over the measurements of several (the rounds of an interleaved run)."""
        return cls.from_times([t for timing in timings for t in timing.times_ms])


@dataclasses.dataclass(frozen=True)
class TimingBudget:
    """How long to measure: GPU warm-up and repetition time (ms), CPU minimum run time (s)."""

    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0
    cpu_min_run_time_s: float = 0.5

    @classmethod
    def quick(cls) -> "TimingBudget":
        return cls(gpu_warmup_ms=5.0, gpu_rep_ms=20.0, cpu_min_run_time_s=0.02)

    def split(self, rounds: int) -> "TimingBudget":
        """The budget of one of `rounds` interleaved rounds (the warm-up is not split)."""
        return dataclasses.replace(self, gpu_rep_ms=max(self.gpu_rep_ms / rounds, 10.0),
                                   cpu_min_run_time_s=self.cpu_min_run_time_s / rounds)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], Any], threads: int, budget: TimingBudget) -> Timing:
    from torch.utils.benchmark import Timer

    fn()  # warm-up, outside the measurement
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=budget.cpu_min_run_time_s)
    return Timing.from_times(t * 1e3 for t in measurement.times)


def _time_cuda_events(fn: Callable[[], Any], budget: TimingBudget) -> list[float]:
    """Per-call times (ms) with CUDA events, flushing L2 before each call (the fallback without triton)."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    warmup = max(1, int(budget.gpu_warmup_ms / estimate))
    reps = max(5, int(budget.gpu_rep_ms / estimate))
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cuda(fn: Callable[[], Any], budget: TimingBudget) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    times = None
    if do_bench is not None:
        try:
            times = do_bench(fn, warmup=int(budget.gpu_warmup_ms), rep=int(budget.gpu_rep_ms), return_mode="all")
        except (TypeError, AssertionError, ValueError):  # a triton whose do_bench cannot return every time
            times = None
    if not isinstance(times, (list, tuple)):
        times = _time_cuda_events(fn, budget)
    return Timing.from_times(times)


def time_callable(fn: Callable[[], Any], device_type: str, threads: int, budget: TimingBudget) -> Timing:
    """Time `fn` (which runs on `device_type`) under `budget`."""
    if device_type == "cuda":
        return time_cuda(fn, budget)
    return time_cpu(fn, threads, budget)
