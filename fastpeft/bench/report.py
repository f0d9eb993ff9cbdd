"""Tables, ratios, the JSON result file and the PNG plot of a benchmark run.

The JSON document: {"schema", "meta" (device, versions, git commit, date, command), "settings",
"results" (one record per case and implementation), "ratios" (per case and fastpeft implementation)}.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import OrderedDict

from .lora_cases import BASELINES, METRICS

SCHEMA = "fastpeft-bench/1"
METRIC_TITLES = {"fwd": "fwd ms", "bwd": "bwd ms", "fwd_bwd": "fwd+bwd ms", "infer": "infer ms"}
MIB = 2.0**20


def _by_case(results: list[dict]) -> "OrderedDict[str, dict[str, dict]]":
    out: OrderedDict = OrderedDict()
    for r in results:
        out.setdefault(r["case"]["label"], OrderedDict())[r["impl"]] = r
    return out


def _time(r: dict | None, metric: str) -> float | None:
    if not r or r.get("status") != "ok":
        return None
    return (r.get("times_ms") or {}).get(metric)


def _div(a, b):
    return a / b if (a is not None and b not in (None, 0)) else None


def ratios(results: list[dict]) -> list[dict]:
    """Per case and fastpeft implementation: time / floor and the speed-up over each baseline, per metric;
    peak memory / floor's; saved activations beyond the inputs."""
    out = []
    for label, impls in _by_case(results).items():
        floor = impls.get("floor")
        for name, r in impls.items():
            if not name.startswith("fastpeft") or r.get("status") != "ok":
                continue
            entry = {"case": label, "tags": r["case"].get("tags", []), "impl": name, "vs_floor": {}, "speedup": {}}
            for m in METRICS:
                t = _time(r, m)
                if t is None:
                    continue
                entry["vs_floor"][m] = _div(t, _time(floor, m))
                for b in BASELINES:
                    tb = _time(impls.get(b), m)
                    if tb is not None:
                        entry["speedup"].setdefault(b, {})[m] = _div(tb, t)
            entry["peak_vs_floor"] = _div(r.get("peak_bytes"), (floor or {}).get("peak_bytes"))
            entry["saved_beyond_inputs_bytes"] = r.get("saved_beyond_inputs_bytes")
            out.append(entry)
    return out


def document(meta: dict, settings: dict, results: list[dict]) -> dict:
    return {"schema": SCHEMA, "meta": meta, "settings": settings, "results": results, "ratios": ratios(results)}


def device_slug(meta: dict) -> str:
    if meta.get("device_type") != "cuda":
        return meta.get("device_type") or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", meta.get("device_name", "gpu").lower()).strip("-") or "gpu"


def file_stem(meta: dict, tag: str | None = None) -> str:
    """<date>_<device>[_tag], e.g. 2025-11-22_nvidia-h100-80gb-hbm3 or 2025-11-22_cpu."""
    stem = f"{meta['date'][:10]}_{device_slug(meta)}"
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


def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.{nd}g}" if abs(v) < 10 else f"{v:.2f}"
    return f"{v:.{nd}g}"


def _mib(b) -> str:
    return "-" if b is None else f"{b / MIB:.3g}"


def device_banner(meta: dict) -> str:
    if meta.get("device_type") == "cuda":
        return f"GPU figures: {meta.get('device_name')} (CUDA {meta.get('cuda')}, torch {meta.get('torch')}, triton {meta.get('triton')})"
    return (f"CPU figures (not GPU performance): {meta.get('device_name')}, {meta.get('cpu_threads')} threads, "
            f"torch {meta.get('torch')}")


def case_rows(impls: dict) -> list[list[str]]:
    floor_fb = _time(impls.get("floor"), "fwd_bwd")
    rows = []
    for name, r in impls.items():
        st = r.get("status")
        if st == "ok":
            chk = "ok"
            worst = (r.get("check") or {}).get("worst")
            if worst is not None:
                chk = f"ok {worst:.2g}"
        else:
            chk = st
        times = [_fmt(_time(r, m)) for m in METRICS]
        ratio = _div(_time(r, "fwd_bwd"), floor_fb)
        rows.append([name, chk, *times, _mib(r.get("peak_bytes")), _mib(r.get("saved_beyond_inputs_bytes")),
                     "-" if ratio is None else f"{ratio:.3f}"])
        if st != "ok" and r.get("reason"):
            rows.append(["", f"  {r['reason'][:150]}"])
    return rows


HEADER = ["impl", "check", *[METRIC_TITLES[m] for m in METRICS], "peak MiB", "saved+ MiB", "f+b/floor"]


def _table(rows: list[list[str]], header: list[str]) -> str:
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(str(r[i])) for r in [header, *full]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    for r in rows:
        if len(r) != len(header):
            lines.append("  ".join(r))
        else:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def format_case(label: str, impls: dict, main_impl: str | None = None) -> str:
    tags = next(iter(impls.values()))["case"].get("tags", [])
    head = f"== {label}" + (f"  [{', '.join(tags)}]" if tags else "")
    text = head + "\n" + _table(case_rows(impls), HEADER)
    for e in ratios(list(impls.values())):
        if main_impl and e["impl"] != main_impl:
            continue
        sp = e["speedup"]
        parts = [f"{b} {sp[b]['fwd_bwd']:.2f}x" for b in BASELINES if b in sp and sp[b].get("fwd_bwd")]
        if parts:
            text += f"\n  {e['impl']} fwd+bwd speed-up over " + ", ".join(parts)
    return text


def print_case(label: str, impls: dict, main_impl: str | None = None, file=None) -> None:
    print(format_case(label, impls, main_impl), file=file or sys.stdout, flush=True)


def print_report(doc: dict, main_impl: str | None = None, file=None) -> None:
    file = file or sys.stdout
    print(device_banner(doc["meta"]), file=file)
    for label, impls in _by_case(doc["results"]).items():
        print(format_case(label, impls, main_impl), file=file)
    print(file=file)
    print(summary_text(doc, main_impl), file=file, flush=True)


def _headline_entries(doc: dict, main_impl: str | None):
    for e in doc.get("ratios") or ratios(doc["results"]):
        if main_impl and e["impl"] != main_impl:
            continue
        if "headline" in e["tags"] or "decode" in e["tags"]:
            yield e


def summary_text(doc: dict, main_impl: str | None = None) -> str:
    lines = ["Headline ratios (time / floor; speed-up = baseline time / fastpeft time):"]
    for e in _headline_entries(doc, main_impl):
        vf, sp = e["vs_floor"], e["speedup"]
        parts = [f"fwd+bwd/floor {_fmt(vf.get('fwd_bwd'))}", f"infer/floor {_fmt(vf.get('infer'))}"]
        parts += [f"vs {b} {_fmt(sp[b].get('fwd_bwd'))}x" for b in BASELINES if b in sp]
        parts.append(f"saved+ {_mib(e.get('saved_beyond_inputs_bytes'))} MiB")
        lines.append(f"  {e['case']} {e['impl']}: " + ", ".join(parts))
    skips: dict = {}
    for r in doc["results"]:
        if r["status"] == "skip":
            skips[r["reason"]] = skips.get(r["reason"], 0) + 1
    for reason, n in skips.items():
        lines.append(f"  skipped x{n}: {reason}")
    bad = [r for r in doc["results"] if r["status"] in ("fail", "error")]
    for r in bad:
        lines.append(f"  {r['status'].upper()}: {r['impl']} at {r['case']['label']}: {r['reason']}")
    return "\n".join(lines)


def markdown(doc: dict, main_impl: str | None = None, only_tags=None) -> str:
    """Markdown tables for RESULTS.md: one per case (optionally only cases with one of `only_tags`)."""
    md = [f"*{device_banner(doc['meta'])}; commit `{(doc['meta'].get('git_commit') or 'unknown')[:12]}`, "
          f"{doc['meta'].get('date')}, command `{doc['meta'].get('command')}`*", ""]
    for label, impls in _by_case(doc["results"]).items():
        tags = next(iter(impls.values()))["case"].get("tags", [])
        if only_tags and not set(tags) & set(only_tags):
            continue
        md.append(f"**{label}**" + (f" ({', '.join(tags)})" if tags else ""))
        md.append("")
        md.append("| " + " | ".join(HEADER) + " |")
        md.append("|" + "---|" * len(HEADER))
        for row in case_rows(impls):
            if len(row) == len(HEADER):
                md.append("| " + " | ".join(row) + " |")
        md.append("")
    md.append("```")
    md.append(summary_text(doc, main_impl))
    md.append("```")
    return "\n".join(md)


def plot(doc: dict, path: str) -> str | None:
    """PNG: fwd+bwd and inference time relative to the floor, and saved activations beyond the inputs,
    per case and implementation. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    cases = _by_case(doc["results"])
    labels = list(cases)
    names = [n for n in OrderedDict.fromkeys(r["impl"] for r in doc["results"] if r["status"] == "ok") if n != "floor"]
    if not labels or not names:
        return None
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.75 * len(labels) * max(1, len(names)) / 3 + 3), 11), sharex=True)
    width = 0.8 / len(names)
    panels = [("fwd_bwd", "fwd+bwd time / floor"), ("infer", "inference fwd time / floor"), (None, "saved beyond inputs (MiB)")]
    for ax, (metric, title) in zip(axes, panels):
        for j, n in enumerate(names):
            vals = []
            for lab in labels:
                impls = cases[lab]
                r = impls.get(n)
                if metric is None:
                    v = (r or {}).get("saved_beyond_inputs_bytes")
                    vals.append(v / MIB if v is not None else math.nan)
                else:
                    v = _div(_time(r, metric), _time(impls.get("floor"), metric))
                    vals.append(v if v is not None else math.nan)
            ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(labels))], vals, width, label=n)
        ax.set_ylabel(title)
        if metric is not None:
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")  # ratios from ~1 to tens on one axis
        else:
            ax.set_yscale("symlog", linthresh=1 / 1024)  # linear below 1 KiB, so that 0 has a place
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=min(len(names), 3))
    axes[0].set_title(device_banner(doc["meta"]), fontsize=9)
    axes[-1].set_xticks(range(len(labels)))
    axes[-1].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["SCHEMA", "ratios", "document", "file_stem", "device_slug", "write_json", "print_report", "print_case",
           "format_case", "summary_text", "markdown", "plot", "device_banner"]
