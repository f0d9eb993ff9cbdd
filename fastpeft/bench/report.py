"""Tables, summaries, markdown and the PNG plot of a result document: one style for every op."""
from __future__ import annotations

import math
import sys
from collections import OrderedDict

from .schema import by_case, is_fastpeft, ratios, time_of

METRIC_ORDER = ("fwd", "bwd", "fwd_bwd", "infer", "step", "refresh")
TITLES = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd", "infer": "infer", "step": "step", "refresh": "refresh"}
MIB = 2.0**20


def _div(a, b):
    return a / b if (a is not None and b not in (None, 0)) else None


def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 10:
        return f"{v:.2f}"
    return f"{v:.{nd}g}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _mib(b) -> str:
    return "-" if b is None else f"{b / MIB:.3g}"


def device_banner(meta: dict) -> str:
    if meta.get("device_type") == "cuda":
        return (f"GPU figures: {meta.get('device_name')} (CUDA {meta.get('cuda')}, torch {meta.get('torch')}, "
                f"triton {meta.get('triton')})")
    return (f"CPU figures (not GPU performance): {meta.get('device_name')}, {meta.get('cpu_threads')} threads, "
            f"torch {meta.get('torch')}")


def ceilings_line(ceilings: dict | None) -> str:
    if not ceilings:
        return "ceilings: not measured (old schema)"
    gemm = ", ".join(f"{k} {_fmt(v)} TFLOP/s" for k, v in (ceilings.get("gemm_tflops") or {}).items())
    return f"ceilings measured in this run: GEMM {gemm}; copy {_fmt(ceilings.get('copy_gbps'))} GB/s"


def _case_metrics(impls: dict) -> tuple[list[str], str]:
    present = {m for r in impls.values() for m in (r.get("times_ms") or {})}
    main = next((r.get("main_metric") for r in impls.values() if r.get("main_metric")), "fwd_bwd")
    return [m for m in METRIC_ORDER if m in present or m == main], main


def _host_metrics(impls: dict) -> list[str]:
    """The metrics with a host-overhead figure (CPU µs per call on tiny tensors) in any result."""
    present = {m for r in impls.values() for m in (r.get("host_us") or {})}
    return [m for m in METRIC_ORDER if m in present]


def _rate_metrics(metrics: list[str], main: str) -> list[str]:
    return list(dict.fromkeys(m for m in (main, "infer") if m in metrics))


def header(impls: dict, floor: str | None) -> list[str]:
    metrics, main = _case_metrics(impls)
    h = ["impl", "check", *[f"{TITLES[m]} ms" for m in metrics]]
    for m in _rate_metrics(metrics, main):
        h += [f"{TITLES[m]} TFLOP/s (GEMM)", f"{TITLES[m]} GB/s (copy)"]
    h += ["peak MiB", "saved+ MiB"]
    h += [f"host µs {TITLES[m]}" for m in _host_metrics(impls)]
    if floor and floor in impls:
        h.append(f"{TITLES[main]}/floor")
    return h


def case_rows(impls: dict, floor: str | None) -> list[list[str]]:
    metrics, main = _case_metrics(impls)
    rate = _rate_metrics(metrics, main)
    floor_t = time_of(impls.get(floor), main) if floor else None
    host = _host_metrics(impls)
    rows = []
    for name, r in impls.items():
        st = r.get("status")
        chk = st
        if st == "ok":
            worst = (r.get("check") or {}).get("worst")
            chk = "ok" if worst is None else f"ok {worst:.2g}"
        row = [name, chk, *[_fmt(time_of(r, m)) for m in metrics]]
        for m in rate:
            rt = (r.get("rates") or {}).get(m) if st == "ok" else None
            row += ["-", "-"] if not rt else [f"{_fmt(rt['tflops'])} ({_pct(rt.get('gemm_frac'))})",
                                              f"{_fmt(rt['gbps'])} ({_pct(rt.get('copy_frac'))})"]
        row += [_mib(r.get("peak_bytes")), _mib(r.get("saved_beyond_inputs_bytes"))]
        row += ["-" if (r.get("host_us") or {}).get(m) is None else f"{r['host_us'][m]:.1f}" for m in host]
        if floor and floor in impls:
            ratio = _div(time_of(r, main), floor_t)
            row.append("-" if ratio is None else f"{ratio:.3f}")
        rows.append(row)
        if st != "ok" and r.get("reason"):
            rows.append(["", f"  {r['reason'][:160]}"])
    return rows


def _table(rows: list[list[str]], head: list[str]) -> str:
    full = [r for r in rows if len(r) == len(head)]
    widths = [max(len(str(r[i])) for r in [head, *full]) for i in range(len(head))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths))]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) if len(r) == len(head) else "  ".join(r))
    return "\n".join(lines)


def main_entries(entries: list[dict], main_impl: str | None) -> list[dict]:
    """The ratio entries of the implementation a user gets by default; in a case without it (a GaLore
    refresh), every fastpeft entry of that case."""
    cases_with_main = {e["case"] for e in entries if e["impl"] == main_impl}
    return [e for e in entries if not main_impl or e["impl"] == main_impl or e["case"] not in cases_with_main]


def _speedups(e: dict, m: str) -> list[str]:
    """"<baseline> <x>x" on the main metric; baselines timed on inference only (PEFT's mixed batch) on that."""
    out = []
    for b, sp in e["speedup"].items():
        if sp.get(m):
            out.append(f"{b} {sp[m]:.2f}x")
        elif sp.get("infer"):
            out.append(f"{b} (infer) {sp['infer']:.2f}x")
    return out


def _speedup_line(impls: dict, floor: str | None, main_impl: str | None) -> str:
    text = ""
    for e in main_entries(ratios(list(impls.values()), floor), main_impl):
        m = e.get("main_metric") or "fwd_bwd"
        parts = _speedups(e, m)
        if parts:
            text += f"\n  {e['impl']} {TITLES.get(m, m)} speed-up over " + ", ".join(parts)
    return text


def format_case(label: str, impls: dict, floor: str | None, main_impl: str | None = None) -> str:
    if not impls:
        return f"== {label}: no implementation ran"
    tags = next(iter(impls.values()))["case"].get("tags", [])
    head = f"== {label}" + (f"  [{', '.join(tags)}]" if tags else "")
    return head + "\n" + _table(case_rows(impls, floor), header(impls, floor)) + _speedup_line(impls, floor, main_impl)


def print_case(label: str, impls: dict, floor: str | None, main_impl: str | None = None, file=None) -> None:
    print(format_case(label, impls, floor, main_impl), file=file or sys.stdout, flush=True)


def summary_text(doc: dict, main_impl: str | None = None) -> str:
    """Headline and decode cases of the main fastpeft implementation, then skips, failures and errors."""
    lines = [f"{doc.get('op', 'lora')}: headline figures (time / floor; speed-up = baseline time / fastpeft time; "
             "% of the measured ceilings):"]
    recs = {(r["case"]["label"], r["impl"]): r for r in doc["results"]}
    for e in main_entries(doc.get("ratios") or [], main_impl):
        if not {"headline", "decode"} & set(e["tags"]):
            continue
        m = e.get("main_metric") or "fwd_bwd"
        parts = [f"{TITLES.get(k, k)}/floor {_fmt(v)}" for k, v in e["vs_floor"].items() if k in (m, "infer")]
        parts += [f"vs {p}" for p in _speedups(e, m)]
        rt = (recs.get((e["case"], e["impl"]), {}).get("rates") or {}).get(m)
        if rt:
            parts.append(f"{TITLES.get(m, m)} at {_pct(rt.get('gemm_frac'))} of GEMM, "
                         f"{_pct(rt.get('copy_frac'))} of copy")
        parts.append(f"saved+ {_mib(e.get('saved_beyond_inputs_bytes'))} MiB")
        host = recs.get((e["case"], e["impl"]), {}).get("host_us") or {}
        if host:
            parts.append("host " + ", ".join(f"{TITLES.get(k, k)} {v:.1f} µs" for k, v in host.items()))
        lines.append(f"  {e['case']} {e['impl']}: " + ", ".join(parts))
    skips: dict = {}
    for r in doc["results"]:
        if r["status"] == "skip":
            skips.setdefault(r["reason"], []).append(r["impl"])
    for reason, impls in skips.items():
        lines.append(f"  skipped x{len(impls)} ({', '.join(dict.fromkeys(impls))}): {reason}")
    for r in doc["results"]:
        if r["status"] in ("fail", "error"):
            lines.append(f"  {r['status'].upper()}: {r['impl']} at {r['case']['label']}: {r['reason']}")
    return "\n".join(lines)


def print_report(doc: dict, main_impl: str | None = None, file=None) -> None:
    file = file or sys.stdout
    floor = doc.get("settings", {}).get("floor")
    print(device_banner(doc["meta"]), file=file)
    print(ceilings_line(doc.get("ceilings")), file=file)
    for label, impls in by_case(doc["results"]).items():
        print(format_case(label, impls, floor, main_impl), file=file)
    print(file=file)
    print(summary_text(doc, main_impl), file=file, flush=True)


def markdown(doc: dict, main_impl: str | None = None, only_tags=None) -> str:
    """Markdown tables for RESULTS.md: one per case (optionally only cases with one of `only_tags`)."""
    meta, floor = doc["meta"], doc.get("settings", {}).get("floor")
    md = [f"*{doc.get('op', 'lora')}: {device_banner(meta)}; {ceilings_line(doc.get('ceilings'))}; commit "
          f"`{(meta.get('git_commit') or 'unknown')[:12]}`, {meta.get('date')}, command `{meta.get('command')}`*", ""]
    for label, impls in by_case(doc["results"]).items():
        tags = next(iter(impls.values()))["case"].get("tags", [])
        if only_tags and not set(tags) & set(only_tags):
            continue
        head = header(impls, floor)
        md += [f"**{label}**" + (f" ({', '.join(tags)})" if tags else ""), "", "| " + " | ".join(head) + " |",
               "|" + "---|" * len(head)]
        md += ["| " + " | ".join(row) + " |" for row in case_rows(impls, floor) if len(row) == len(head)]
        md.append("")
    md += ["```", summary_text(doc, main_impl), "```"]
    return "\n".join(md)


def plot(doc: dict, path: str) -> str | None:
    """PNG, one style for every op: per case and implementation, the main metric's time relative to the
    floor (or, in a case without one, to its first baseline), its fraction of the binding ceiling (max of the
    GEMM and copy fractions), and the saved activations beyond the inputs. Returns the path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    floor = doc.get("settings", {}).get("floor")
    cases = by_case(doc["results"])
    labels = list(cases)
    names = list(OrderedDict.fromkeys(r["impl"] for r in doc["results"] if r["status"] == "ok" and r["impl"] != floor))
    if not labels or not names:
        return None

    def main_of(impls):
        return _case_metrics(impls)[1]

    def baseline_of(impls):  # the floor, or where a case has none its first baseline that ran
        if floor in impls and impls[floor].get("status") == "ok":
            return impls[floor]
        return next((r for n, r in impls.items() if not is_fastpeft(n) and r.get("status") == "ok"), None)

    def time_panel(r, impls):
        return _div(time_of(r, main_of(impls)), time_of(baseline_of(impls), main_of(impls)))

    def roof_panel(r, impls):
        rt = ((r or {}).get("rates") or {}).get(main_of(impls)) if (r or {}).get("status") == "ok" else None
        fr = [v for v in ((rt or {}).get("gemm_frac"), (rt or {}).get("copy_frac")) if v is not None]
        return max(fr) if fr else None

    def saved_panel(r, impls):
        v = (r or {}).get("saved_beyond_inputs_bytes") if (r or {}).get("status") == "ok" else None
        return None if v is None else v / MIB

    panels = [(time_panel, "main metric time / floor\n(no floor: / first baseline)", "log"),
              (roof_panel, "fraction of the binding ceiling", "linear"),
              (saved_panel, "saved beyond inputs (MiB)", "symlog")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.6 * len(labels) * max(1, len(names)) / 3 + 3), 11),
                             sharex=True)
    width = 0.8 / len(names)
    for ax, (fn, title, scale) in zip(axes, panels):
        for j, n in enumerate(names):
            vals = [fn(cases[lab].get(n), cases[lab]) for lab in labels]
            ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(labels))],
                   [math.nan if v is None else v for v in vals], width, label=n)
        ax.set_ylabel(title, fontsize=8)
        if scale == "log":
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
        elif scale == "symlog":
            ax.set_yscale("symlog", linthresh=1 / 1024)  # linear below 1 KiB, so that 0 has a place
            ax.set_ylim(bottom=0)
        else:
            ax.axhline(1.0, color="k", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=min(len(names), 4))
    axes[0].set_title(f"{doc.get('op', 'lora')}: {device_banner(doc['meta'])}", fontsize=9)
    axes[-1].set_xticks(range(len(labels)))
    axes[-1].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["device_banner", "ceilings_line", "header", "case_rows", "format_case", "print_case", "summary_text",
           "print_report", "markdown", "plot", "is_fastpeft"]
