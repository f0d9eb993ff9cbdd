"""Measurement primitives of the benchmarks: latency, peak memory, saved activations, run metadata.

Latency: on CUDA, CUDA events around each repetition, the median of many after a warm-up. Every
repetition starts from an idle GPU (synchronise before the start event), so the figure is the latency of
one call including its launch overhead, not the throughput of a queue the CPU keeps full; the L2 cache is
optionally flushed before the start event. On the CPU, time.perf_counter around each repetition.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

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


def _summary(times_ms: list[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), s[0], len(s))


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    setup: Callable[[], object] | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
    flush_l2: bool = False,
) -> Timing:
    """Median latency of fn() in ms. setup() runs before every call, outside the timed region.

    The number of repetitions fills about rep_ms (at least min_reps, at most max_reps) after about
    warmup_ms of warm-up; the first call (compilation, autotuning) is never timed.
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
    estimate = min(one() for _ in range(3))
    estimate = max(estimate, 1e-3)
    for _ in range(max(1, min(int(warmup_ms / estimate), max_reps))):
        one()
    n = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    return _summary([one() for _ in range(n)])


def _storage_key(t: torch.Tensor) -> tuple:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensors:
    """Counts what autograd saves for backward while active (torch.autograd.graph.saved_tensors_hooks).

    Each distinct storage is counted once, at its full size (a saved slice keeps its whole storage alive).
    Storages of `inputs` (x, the weights, the adapters) are listed separately: `beyond_inputs_bytes` is the
    activation memory a layer adds by being trained. Tensors an autograd.Function keeps as ctx attributes
    instead of save_for_backward are invisible to the hooks.
    """

    def __init__(self, inputs: Iterable[torch.Tensor] = ()):
        self._input_keys = {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
        self._seen: dict[tuple, dict] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._seen:
            self._seen[key] = {
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "bytes": int(t.untyped_storage().nbytes()),
                "input": key in self._input_keys,
            }
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def entries(self) -> list[dict]:
        return list(self._seen.values())

    @property
    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self._seen.values())

    @property
    def beyond_inputs(self) -> list[dict]:
        return [e for e in self._seen.values() if not e["input"]]

    @property
    def beyond_inputs_bytes(self) -> int:
        return sum(e["bytes"] for e in self.beyond_inputs)


def reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


@dataclass
class Footprint:
    """One forward+backward: its output, peak memory beyond what was allocated before, saved tensors."""

    output: torch.Tensor
    peak_bytes: int | None  # None where the device has no allocator statistics (CPU)
    saved: SavedTensors


def fwd_bwd_footprint(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor,
                      *, inputs: Iterable[torch.Tensor], grads: Iterable[torch.Tensor]) -> Footprint:
    """Run y = forward(x); y.backward(dy) once, measuring peak allocated memory and the saved tensors.

    Gradients in `grads` are reset first, so the peak includes allocating them; the peak is relative to
    what was allocated before the call (inputs, weights and the caller's buffers are excluded).
    """
    grads = list(grads)
    reset_grads(grads)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    saved = SavedTensors(inputs)
    with saved:
        y = forward(x)
    y.backward(dy)
    peak = None
    if cuda:
        torch.cuda.synchronize(x.device)
        peak = int(torch.cuda.max_memory_allocated(x.device) - base)
    return Footprint(y.detach(), peak, saved)


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: str | None = None) -> dict:
    """Commit and dirtiness of the source tree fastpeft was imported from (None outside a git checkout)."""
    root = path or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit = _git(["rev-parse", "HEAD"], root) or os.environ.get("FASTPEFT_GIT_COMMIT")
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or metadata missing
        return None


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {
            "device_type": "cuda",
            "device_name": torch.cuda.get_device_name(device),
            "compute_capability": f"{p.major}.{p.minor}",
            "device_memory_bytes": int(p.total_memory),
            "multiprocessors": int(p.multi_processor_count),
        }
    return {"device_type": device.type, "device_name": _cpu_name(), "cpu_threads": torch.get_num_threads()}


def environment(device: torch.device, command: str | None = None) -> dict:
    """Everything a result file must record to be reproducible and comparable."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import fastpeft

        fastpeft_version = fastpeft.__version__
    except Exception:
        fastpeft_version = None
    if command is None:
        command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "cwd": os.getcwd(),
        **device_info(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "peft": _version("peft"),
        "fastpeft": fastpeft_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # CPU figures suffer from other load
        "env": {k: os.environ[k] for k in ("FASTPEFT_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        **git_state(),
    }
    return meta


__all__ = [
    "Timing", "time_fn", "SavedTensors", "Footprint", "fwd_bwd_footprint", "reset_grads", "synchronize",
    "l2_flush_buffer", "environment", "device_info", "git_state",
]
