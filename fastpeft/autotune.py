"""Measured backend choice: backend="auto" on a CUDA device times the backends that can run and keeps the fastest.

An op that measures (the LoRA linear's backend: fastpeft/ops/lora_linear_auto.py; the LoRA GEMM's tile config:
kernels/lora_gemm_tuning.py, "candidates" then being config names) asks `choose(op, key, ...)` on every
call. The first call for a key times each candidate backend on fresh tensors of the call's shapes and dtypes
(never the caller's tensors, never torch's RNG: the runners draw from their own generator and take a fixed
dropout seed), a few repetitions after a warm-up, and keeps the fastest; later calls find it in memory (one
dict lookup). The key is the op's: device, dtype, rows bucketed to powers of two, the other dimensions, the
rank bucketed, dropout on or off, and the pass (forward, or backward with the gradients it computes).

Decisions persist in a JSON file: $FASTPEFT_AUTOTUNE_CACHE, else <cache dir>/fastpeft/autotune-<device>-<versions>.json
(<cache dir>: $XDG_CACHE_HOME or ~/.cache), written atomically (temporary file, then os.replace). The file records
the device name and the fastpeft, torch and Triton versions; a file that does not parse, or that another device
or other versions wrote, is ignored with one warning (and replaced at the next write).

No measuring where it cannot be done or would be wrong: under torch.compile tracing
(torch.compiler.is_compiling()) and while a CUDA graph is captured (torch.cuda.is_current_stream_capturing()),
the cached decision or else the static default decides (fastpeft._backend.static_default), and nothing is
remembered, so a later eager call still measures. FASTPEFT_AUTOTUNE=0 turns measuring off (static defaults;
fastpeft._backend.resolve_backend then never returns "measured"). All measuring of one process together stops
after a cap, FASTPEFT_AUTOTUNE_CAP_S seconds (default 30): past it, new keys take the static default.
fastpeft.backend_report()["autotune"] lists every decision of the process with its per-backend timings.

Tests inject the timer (`set_timer`) and the runners; nothing here needs a GPU.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from typing import Callable

import torch

ENV_ENABLE = "FASTPEFT_AUTOTUNE"
ENV_CACHE = "FASTPEFT_AUTOTUNE_CACHE"
ENV_CAP = "FASTPEFT_AUTOTUNE_CAP_S"
DEFAULT_CAP_S = 30.0
WARMUP = 2  # calls before timing (the first compiles the Triton kernels)
REPS = 5  # timed calls; the median is kept
FORMAT = 1
TIMING_SEED = 12345  # the runners' dropout seed: a fixed int, so no RNG is drawn


def enabled() -> bool:
    """Whether auto measures: unless $FASTPEFT_AUTOTUNE is 0 / false / off / no."""
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def cap_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_CAP, DEFAULT_CAP_S)))
    except ValueError:
        return DEFAULT_CAP_S


def m_bucket(m: int) -> int:
    """Rows bucketed to the next power of two (1, 2, 4, ...)."""
    return 1 << max(0, int(m) - 1).bit_length()


def r_bucket(r: int) -> int:
    """Rank bucketed as the kernels tile it: the next power of two, at least 16."""
    return max(16, m_bucket(r))


# ----------------------------------------------------------------------------------------------- timing


def cuda_event_timer(fn: Callable[[], object], warmup: int = WARMUP, reps: int = REPS) -> float:
    """Median milliseconds of fn() on the current CUDA stream, by CUDA events, after `warmup` calls."""
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
    times.sort()
    return times[len(times) // 2]


_timer: Callable[[Callable[[], object]], float] = cuda_event_timer


def set_timer(timer: Callable[[Callable[[], object]], float] | None) -> None:
    """Replace the timer (timer(fn) -> milliseconds; None restores the CUDA-event timer). For tests."""
    global _timer
    _timer = timer or cuda_event_timer


# ----------------------------------------------------------------------------------------------- runners


class Run:
    """One candidate's run on fresh tensors; `backend` names the candidate (an injected test timer may read it)."""

    def __init__(self, backend: str, fn: Callable[[], object]):
        self.backend, self.fn = backend, fn

    def __call__(self):
        return self.fn()


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    """A private generator for the runners' fresh tensors: torch's default RNG is never drawn from."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(shape, dtype: torch.dtype, device: torch.device, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Normal values (times `scale`) in `dtype`, drawn in fp32 from `g`."""
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def randn_like(t: torch.Tensor, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A fresh tensor of t's shape, dtype and device from `g`, in t's memory order: a 2-D tensor whose rows have
    unit stride (a transposed view) comes as the transpose of a row-major one, so the kernels read it the same way."""
    if t.dim() == 2 and t.stride(0) < t.stride(1):
        return randn(tuple(t.shape)[::-1], t.dtype, t.device, g, scale).t()
    return randn(tuple(t.shape), t.dtype, t.device, g, scale)


# ----------------------------------------------------------------------------------------------- state


class _State:
    """One process's decisions: `memory` key -> backend (the hot path's dict), `records` key -> report entry,
    `disk` file path -> {key string: entry} as loaded, `spent` seconds of measuring so far."""

    def __init__(self):
        self.memory: dict = {}
        self.records: dict = {}
        self.disk: dict = {}
        self.warned: set = set()
        self.spent = 0.0
        self.depth = 0  # measurements in progress: one may run inside another's runner (the GEMM's config
        # inside the LoRA backend's warm-up); only the outermost adds its time to `spent`
        self.lock = threading.RLock()


_STATE = _State()


def reset() -> None:
    """Forget every decision of this process (the files stay): what a new process starts with."""
    global _STATE
    _STATE = _State()


def _versions() -> dict:
    fp = sys.modules.get("fastpeft")
    try:
        import triton

        tv = triton.__version__
    except Exception:  # a broken Triton: still a key, it cannot be chosen anyway
        tv = None
    return {"fastpeft": getattr(fp, "__version__", None), "torch": torch.__version__, "triton": tv}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "device"


def cache_path(device: torch.device) -> str:
    """The decisions file of `device`: $FASTPEFT_AUTOTUNE_CACHE, else under the user's cache directory."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return os.path.expanduser(env)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    v = _versions()
    tag = "-".join(_slug(str(v[k])) for k in ("fastpeft", "torch", "triton"))
    return os.path.join(root, "fastpeft", f"autotune-{_slug(device_name(device))}-{tag}.json")


def _warn_once(path: str, why: str) -> None:
    if path in _STATE.warned:
        return
    _STATE.warned.add(path)
    warnings.warn(f"fastpeft autotune: ignoring the decisions file {path}: {why}; the backends will be measured "
                  f"again and the file rewritten", RuntimeWarning, stacklevel=3)


def _read(path: str, dev_name: str) -> dict:
    """The {key string: entry} of a valid file for `dev_name` and these versions; {} otherwise (one warning for
    a corrupt or stale file, none for a missing one)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _warn_once(path, f"it does not parse ({type(exc).__name__}: {exc})")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("decisions"), dict):
        _warn_once(path, "not a fastpeft autotune file of this format")
        return {}
    if data.get("device") != dev_name or data.get("versions") != _versions():
        _warn_once(path, f"written for {data.get('device')!r} with {data.get('versions')}, not {dev_name!r} with "
                         f"{_versions()}")
        return {}
    good = {}
    for k, e in data["decisions"].items():
        if isinstance(e, dict) and isinstance(e.get("backend"), str):
            good[k] = e
    return good


def _loaded(path: str, dev_name: str) -> dict:
    d = _STATE.disk.get(path)
    if d is None:
        d = _STATE.disk[path] = _read(path, dev_name)
    return d


def _write(path: str, dev_name: str, decisions: dict) -> None:
    """Atomically write `decisions` (merged over what a valid file holds now: other processes may have added)."""
    try:
        with warnings.catch_warnings():  # the merge re-reads; its warning was given at load time
            warnings.simplefilter("ignore")
            merged = {**_read(path, dev_name), **decisions}
        data = {"format": FORMAT, "device": dev_name, "versions": _versions(), "decisions": merged}
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:  # a read-only home: the decision still holds for this process
        _warn_once(path + " (write)", f"it cannot be written ({exc})")


def key_string(key: tuple) -> str:
    return "|".join(str(k) for k in key)


# ----------------------------------------------------------------------------------------------- choice


def measuring_blocked() -> str | None:
    """Why nothing may be timed now (torch.compile tracing, CUDA graph capture), or None."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def _record(key, op, backend, times, source, errors=None):
    _STATE.records[key] = {"op": op, "key": key_string(key[2:]), "device": str(key[1]), "backend": backend,
                           "times_ms": dict(times or {}), "source": source, **({"errors": errors} if errors else {})}


def lookup(op: str, key: tuple, device: torch.device) -> str | None:
    """The decision in memory for `op` at `key` on `device`, or None: the hot path's one dict lookup."""
    return _STATE.memory.get((op, device, *key))


def choose(op: str, key: tuple, device: torch.device, candidates: Callable[[], list[str]],
           runner: Callable[[str], Callable[[], object]], static: Callable[[], str]) -> str:
    """The backend for `op` at `key` (a tuple of hashables with readable str(), without the op and device) on
    `device`.

    candidates(): the backends that can run; runner(name): a function that runs the pass once with that backend
    on fresh tensors (timed by the timer); static(): the static default. Measures at most once per key and
    process; decisions found in the file are not measured again."""
    full = (op, device, *key)
    hit = _STATE.memory.get(full)
    if hit is not None:
        return hit
    with _STATE.lock:
        hit = _STATE.memory.get(full)
        if hit is not None:
            return hit
        return _decide(op, full, device, candidates, runner, static)


def _decide(op, full, device, candidates, runner, static) -> str:
    dev_name = device_name(device)
    path = cache_path(device)
    ks = f"{op}|{key_string(full[2:])}"
    cands = list(candidates())
    blocked = measuring_blocked()
    on_disk = _loaded(path, dev_name).get(ks) if enabled() else None
    if on_disk is not None and on_disk["backend"] in cands:
        _STATE.memory[full] = on_disk["backend"]
        _record(full, op, on_disk["backend"], on_disk.get("times_ms"), "disk")
        return on_disk["backend"]
    if blocked is not None:  # not remembered: the next eager call measures
        return static()
    if not enabled() or len(cands) < 2:
        choice = static() if len(cands) != 1 else cands[0]
        _STATE.memory[full] = choice
        _record(full, op, choice, None, "static" if not enabled() else "only candidate")
        return choice
    cap = cap_seconds()
    if _STATE.spent >= cap:
        choice = static()
        _STATE.memory[full] = choice
        _record(full, op, choice, None, f"static (tuning cap of {cap:g} s spent)")
        return choice
    times, errors = {}, {}
    t0 = time.perf_counter()
    # the runners use their own generator; restoring the CUDA RNG guards against a stray draw
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    _STATE.depth += 1
    try:
        with torch.no_grad():  # the runners' tensors never join an autograd graph
            for name in cands:
                try:
                    times[name] = float(_timer(runner(name)))
                except Exception as exc:  # a backend that fails here (out of memory, no kernel image) is passed over
                    errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        if rng is not None:
            torch.cuda.set_rng_state(rng, device)
        _STATE.depth -= 1
        if _STATE.depth == 0:
            _STATE.spent += time.perf_counter() - t0
    if not times:
        choice = static()
        _STATE.memory[full] = choice
        _record(full, op, choice, None, "static (every candidate failed)", errors)
        return choice
    choice = min(times, key=times.get)
    _STATE.memory[full] = choice
    _record(full, op, choice, times, "measured", errors)
    entry = {"backend": choice, "times_ms": times}
    _loaded(path, dev_name)[ks] = entry
    _write(path, dev_name, {ks: entry})
    return choice


_DESCRIBERS: dict = {}


def set_describer(op: str, describe: Callable[[tuple, str], dict] | None) -> None:
    """describe(key, choice) -> a dict that `report` adds to each of op's decisions as "detail" (the LoRA GEMM:
    the chosen config's tiles); computed when reported, never on the hot path. None removes it."""
    if describe is None:
        _DESCRIBERS.pop(op, None)
    else:
        _DESCRIBERS[op] = describe


def _detail(full: tuple, rec: dict) -> dict:
    describe = _DESCRIBERS.get(rec["op"])
    if describe is None:
        return {}
    try:
        return {"detail": describe(full[2:], rec["backend"])}
    except Exception as exc:  # a report never fails for a description
        return {"detail": {"error": f"{type(exc).__name__}: {exc}"}}


def report() -> dict:
    """This process's decisions (op, device, key, backend, per-backend milliseconds, source: measured / disk /
    static / ..., and the op's "detail" where it has a describer), the time spent measuring and the cap, and
    whether measuring is on."""
    return {"enabled": enabled(), "spent_s": round(_STATE.spent, 4), "cap_s": cap_seconds(),
            "decisions": [{**r, **_detail(full, r)} for full, r in _STATE.records.items()]}


__all__ = ["choose", "lookup", "enabled", "cache_path", "report", "reset", "set_timer", "m_bucket", "r_bucket",
           "measuring_blocked", "cuda_event_timer", "set_describer", "Run", "generator", "randn", "randn_like",
           "TIMING_SEED", "ENV_ENABLE", "ENV_CACHE", "ENV_CAP", "DEFAULT_CAP_S"]
