"""Latency of one call: the median of many repetitions after a warm-up.

CUDA: CUDA events around each repetition, synchronised before the start event, so the figure is the
latency of one call including its launch overhead (not the throughput of a queue the CPU keeps full); the
L2 cache is optionally flushed before the start event. CPU: time.perf_counter around each repetition.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    """Per-call times in milliseconds over `reps` repetitions."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLUSH_BUFFERS: dict = {}


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer larger than the device's L2 cache: writing it evicts what a previous repetition left there."""
    key = str(device)
    if key not in _FLUSH_BUFFERS:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        nbytes = max(256 << 20, 4 * l2)
        _FLUSH_BUFFERS[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return _FLUSH_BUFFERS[key]


def _quantile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), s[0], len(s))


def time_fn(fn: Callable[[], object], device: torch.device, *, setup: Callable[[], object] | None = None,
            warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000,
            flush_l2: bool = False) -> Timing:
    """Median latency of fn() in ms. setup() runs before every call, outside the timed region.

    The number of repetitions fills about rep_ms (at least min_reps, at most max_reps) after about
    warmup_ms of warm-up; the first call (compilation, autotuning) is never timed. A call so slow that
    min_reps of them would take over 10·rep_ms (an SVD of a large gradient) gets 3 repetitions, no warm-up.
    """
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"min_reps/max_reps: expected 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    cuda = device.type == "cuda"
    flush = l2_flush_buffer(device) if (flush_l2 and cuda) else None

    def one() -> float:
        if setup is not None:
            setup()
        if flush is not None:
            flush.zero_()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    one()  # compile, autotune, allocate: never timed
    first = one()
    if first * min_reps > 10 * rep_ms:
        return summarize([first, one(), one()])
    estimate = max(min(first, one(), one()), 1e-3)
    for _ in range(max(1, min(int(warmup_ms / estimate), max_reps))):
        one()
    n = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    return summarize([one() for _ in range(n)])


def host_us(fn: Callable[[], object], device: torch.device, *, setup: Callable[[], object] | None = None,
            calls: int = 200, warmup: int = 20) -> float:
    """Median CPU time of this thread per call of fn(), in µs: the host side of a call (Python, dispatch,
    launches). Meant for tiny tensors, where the kernels' own work is negligible; on CUDA the kernels run
    asynchronously, so only their launch is counted."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times = []
    clock = time.thread_time_ns
    for _ in range(calls):
        if setup is not None:
            setup()
        t0 = clock()
        fn()
        times.append(clock() - t0)
    synchronize(device)
    return statistics.median(times) / 1e3


__all__ = ["Timing", "time_fn", "host_us", "synchronize", "l2_flush_buffer", "summarize"]
