"""The JSON result file every op writes, and the run metadata that makes it reproducible.

{"schema": "fastpeft-bench/2", "op", "meta" (date, command, device, versions, git commit, load),
 "settings" (preset, impls, timing, compile policy, ...), "ceilings" (measured GEMM TFLOP/s per dtype and
 copy GB/s), "results" (one record per case and implementation: check (worst error ratio; the tolerance
 row, K and bound of tolerances.py), memory, times_ms, timing, work, rates), "ratios" (per case and fastpeft
 implementation: time / floor, speed-up over each baseline)}.
Files: <out>/<date>_<device>_<op>[_tag].json. Schema 1 files (the LoRA-only harness, <date>_<device>.json)
load as op "lora" without ceilings or rates.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from collections import OrderedDict

import torch

SCHEMA = "fastpeft-bench/2"
OLD_SCHEMAS = ("fastpeft-bench/1",)


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
        return {"device_type": "cuda", "device_name": torch.cuda.get_device_name(device),
                "compute_capability": f"{p.major}.{p.minor}", "device_memory_bytes": int(p.total_memory),
                "multiprocessors": int(p.multi_processor_count)}
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

        fastpeft_version = fastpeft.__version__  # also from a source tree on PYTHONPATH (the GPU session)
    except Exception:
        fastpeft_version = None
    if command is None:
        command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command, "cwd": os.getcwd(), **device_info(device),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "peft": _version("peft"),
        "transformers": _version("transformers"), "galore_torch": _version("galore-torch"),
        "fastpeft": fastpeft_version, "python": platform.python_version(), "platform": platform.platform(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # CPU figures suffer from load
        "env": {k: os.environ[k] for k in ("FASTPEFT_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
        **git_state(),
    }


def by_case(results: list[dict]) -> "OrderedDict[str, OrderedDict[str, dict]]":
    out: OrderedDict = OrderedDict()
    for r in results:
        out.setdefault(r["case"]["label"], OrderedDict())[r["impl"]] = r
    return out


def time_of(r: dict | None, metric: str) -> float | None:
    if not r or r.get("status") != "ok":
        return None
    return (r.get("times_ms") or {}).get(metric)


def _div(a, b):
    return a / b if (a is not None and b not in (None, 0)) else None


def is_fastpeft(name: str) -> bool:
    return name.startswith("fastpeft")


def ratios(results: list[dict], floor: str | None) -> list[dict]:
    """Per case and fastpeft implementation: time / floor and the speed-up over every other implementation
    (the baselines), per metric; peak memory / floor's; saved activations beyond the inputs."""
    out = []
    for label, impls in by_case(results).items():
        fl = impls.get(floor) if floor else None
        for name, r in impls.items():
            if not is_fastpeft(name) or r.get("status") != "ok":
                continue
            e = {"case": label, "tags": r["case"].get("tags", []), "impl": name, "main_metric": r.get("main_metric"),
                 "vs_floor": {}, "speedup": {}}
            for m, t in (r.get("times_ms") or {}).items():
                if fl is not None:
                    e["vs_floor"][m] = _div(t, time_of(fl, m))
                for b, rb in impls.items():
                    tb = time_of(rb, m)
                    if b != floor and not is_fastpeft(b) and tb is not None:
                        e["speedup"].setdefault(b, {})[m] = _div(tb, t)
            e["peak_vs_floor"] = _div(r.get("peak_bytes"), (fl or {}).get("peak_bytes"))
            e["saved_beyond_inputs_bytes"] = r.get("saved_beyond_inputs_bytes")
            out.append(e)
    return out


def document(op: str, floor: str | None, meta: dict, settings: dict, ceilings: dict | None,
             results: list[dict]) -> dict:
    return {"schema": SCHEMA, "op": op, "meta": meta, "settings": dict(settings, floor=floor), "ceilings": ceilings,
            "results": results, "ratios": ratios(results, floor)}


def load(path: str) -> dict:
    """A result file of this schema or of an older one (upgraded in memory: op lora, no ceilings)."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    schema = doc.get("schema")
    if schema in OLD_SCHEMAS:
        doc = dict(doc, op="lora", ceilings=None, settings=dict(doc.get("settings", {}), floor="floor"))
        for r in doc["results"]:
            r.setdefault("main_metric", "fwd_bwd")
    elif schema != SCHEMA:
        raise ValueError(f"{path}: expected schema {SCHEMA} (or {', '.join(OLD_SCHEMAS)}), got {schema!r}")
    return doc


def device_slug(meta: dict) -> str:
    if meta.get("device_type") != "cuda":
        return meta.get("device_type") or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", meta.get("device_name", "gpu").lower()).strip("-") or "gpu"


def file_stem(meta: dict, op: str, tag: str | None = None) -> str:
    """<date>_<device>_<op>[_tag], e.g. 2026-11-22_nvidia-h200_lora or 2026-11-22_cpu_galore."""
    stem = f"{meta['date'][:10]}_{device_slug(meta)}_{op}"
    return f"{stem}_{re.sub(r'[^A-Za-z0-9.-]+', '-', tag)}" if tag else stem


def _clean(obj):
    """JSON without NaN/inf (strict parsers reject them): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(doc: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(doc), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file
    return path


__all__ = ["SCHEMA", "environment", "device_info", "git_state", "by_case", "time_of", "ratios", "document", "load",
           "file_stem", "device_slug", "write_json", "is_fastpeft"]
