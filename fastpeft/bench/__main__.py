"""python -m fastpeft.bench: time fastpeft's LoRA linear against the floor and the baselines, print a table,
write <out>/<date>_<device>.json and a PNG plot.

    python -m fastpeft.bench                      # quick preset on a GPU, cpu preset without one
    python -m fastpeft.bench --preset full        # the full grid (GPU: ~1 min of timing plus compilation)
    python -m fastpeft.bench --m 1 8192 --shape 4096x4096 --r 16 --dropout 0.1 --dtype bf16 fp16
    python -m fastpeft.bench --list               # the cases and an estimated run time, nothing run
    python -m fastpeft.bench --summarize benchmarks/results/<file>.json --markdown

Axes given explicitly (--m/--shape/--r/--dropout) replace the preset's grid by their cross product; an
axis not given takes the preset's headline value. Exit status 1 when an implementation fails its
correctness check or raises.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import lora_cases as lc
from . import report
from .harness import environment


def _shape(text: str) -> tuple[int, int]:
    try:
        a, b = text.lower().split("x")
        shape = (int(a), int(b))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INxOUT such as 4096x11008, got {text!r}") from None
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def _prob(text: str) -> float:
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a dropout probability in [0, 1), got {text!r}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastpeft.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(lc.PRESETS), help="quick (default on a GPU), full, cpu (default without one)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--m", type=_positive, nargs="+", help="tokens M")
    p.add_argument("--shape", type=_shape, nargs="+", help="INxOUT widths, e.g. 4096x11008")
    p.add_argument("--r", type=_positive, nargs="+", help="LoRA ranks")
    p.add_argument("--dropout", type=_prob, nargs="+", help="LoRA dropout probabilities")
    p.add_argument("--dtype", choices=sorted(lc.DTYPES), nargs="+", help="default: the preset's (bf16; fp32 for cpu)")
    p.add_argument("--impl", nargs="+", default=list(lc.IMPL_FAMILIES),
                   help=f"implementations: {' '.join(lc.IMPL_FAMILIES)} or fastpeft[torch]/fastpeft[triton]")
    p.add_argument("--backend", nargs="+", default=["torch", "triton"], choices=["torch", "triton"],
                   help="fastpeft backends to time where they can run")
    p.add_argument("--metrics", nargs="+", choices=lc.METRICS, default=list(lc.METRICS))
    p.add_argument("--warmup-ms", type=float)
    p.add_argument("--rep-ms", type=float, help="time to fill with repetitions, per implementation and metric")
    p.add_argument("--min-reps", type=_positive)
    p.add_argument("--max-reps", type=_positive)
    p.add_argument("--flush", choices=["auto", "always", "never"], default="auto",
                   help="flush L2 before each repetition: auto = for memory-bound cases on CUDA")
    p.add_argument("--threads", type=_positive, help="CPU threads for torch (default: 1 for the cpu preset, else torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, help="seconds; cases not started by then are recorded as skipped")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON and PNG")
    p.add_argument("--tag", help="appended to the file name: <date>_<device>_<tag>.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and the estimated run time, run nothing")
    p.add_argument("--summarize", metavar="JSON", help="print the tables of an existing result file and exit")
    p.add_argument("--markdown", action="store_true", help="with --summarize: markdown tables for RESULTS.md")
    p.add_argument("--only-tags", nargs="+", help="with --markdown: only cases tagged so (headline, decode, axis:m, ...)")
    return p


def _impl_names(args, device) -> list[str]:
    names = []
    for item in args.impl:
        if item == "fastpeft":
            names += [f"fastpeft[{b}]" for b in args.backend]
        elif item in lc.IMPL_FAMILIES or item in ("fastpeft[torch]", "fastpeft[triton]"):
            names.append(item)
        else:
            raise SystemExit(f"--impl: expected one of {list(lc.IMPL_FAMILIES)} or fastpeft[torch]/fastpeft[triton], got {item!r}")
    if "floor" not in names:
        names.insert(0, "floor")  # every ratio is relative to it
    return list(dict.fromkeys(names))


def _settings(args, preset: str) -> lc.Settings:
    t = dict(lc.PRESETS[preset]["timing"])
    for k in ("warmup_ms", "rep_ms", "min_reps", "max_reps"):
        if getattr(args, k) is not None:
            t[k] = getattr(args, k)
    if t["max_reps"] < t["min_reps"]:
        raise SystemExit(f"--max-reps: expected >= min reps {t['min_reps']}, got {t['max_reps']}")
    return lc.Settings(flush=args.flush, metrics=tuple(args.metrics), seed=args.seed, **t)


def summarize(path: str, as_markdown: bool, only_tags=None) -> int:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    main_impl = doc.get("settings", {}).get("main_impl")
    if as_markdown:
        print(report.markdown(doc, main_impl, only_tags))
    else:
        report.print_report(doc, main_impl)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.markdown, args.only_tags)
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    preset = args.preset or ("quick" if device.type == "cuda" else "cpu")
    cases = lc.grid_cases(preset, m=args.m, shape=args.shape, r=args.r, dropout=args.dropout, dtypes=args.dtype)
    names = _impl_names(args, device)
    st = _settings(args, preset)
    backends = lc.fastpeft_backends(device)
    runnable = [n for n in names if not (n.startswith("fastpeft[") and backends.get(n[9:-1]))]
    est = lc.estimate_seconds(cases, len(runnable), st, device)
    if args.list:  # no device needed: estimate a GPU run from a CPU machine with --device cuda
        print(f"preset {preset} on {device.type}: {len(cases)} cases x {len(runnable)} implementations "
              f"({', '.join(runnable)}); estimated {est:.0f} s plus imports and compilation")
        for c in cases:
            print(f"  {c.label}  [{', '.join(c.tags)}]")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    threads = args.threads or (lc.PRESETS[preset].get("threads") if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    main_impl = lc.auto_fastpeft(device)
    meta = environment(device)
    settings = {"preset": preset, "impls": names, "main_impl": main_impl, "descriptions": lc.DESCRIPTIONS,
                "timing": {k: getattr(st, k) for k in ("warmup_ms", "rep_ms", "min_reps", "max_reps", "flush")},
                "metrics": list(st.metrics), "seed": st.seed, "time_budget_s": args.time_budget,
                "estimated_s": round(est, 1),
                "method": ("CUDA events, synchronised before each repetition, median after warm-up" if device.type == "cuda"
                           else "time.perf_counter median after warm-up"),
                "fastpeft_backends": backends}
    print(report.device_banner(meta))
    print(f"preset {preset}: {len(cases)} cases x {len(runnable)} implementations ({', '.join(runnable)}); "
          f"estimated {est:.0f} s plus imports and compilation", flush=True)
    json_path = os.path.join(args.out, report.file_stem(meta, args.tag) + ".json")
    results: list[dict] = []
    t0 = time.monotonic()
    for i, case in enumerate(cases):
        if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
            results += [lc._result(case, n, "skip", f"time budget of {args.time_budget:g} s spent") for n in names]
            continue
        res = lc.run_case(case, names, device, st)
        results += res
        report.print_case(case.label, {r["impl"]: r for r in res}, main_impl)
        if not args.no_json:
            settings["elapsed_s"] = round(time.monotonic() - t0, 1)
            report.write_json(report.document(meta, settings, results), json_path)
    doc = report.document(meta, settings, results)
    print()
    print(report.summary_text(doc, main_impl))
    print(f"elapsed {time.monotonic() - t0:.0f} s (estimated {est:.0f} s)")
    if not args.no_json:
        settings["elapsed_s"] = round(time.monotonic() - t0, 1)
        settings["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        print("wrote", report.write_json(doc, json_path))
        if not args.no_plot:
            png = report.plot(doc, json_path[:-5] + ".png")
            print("wrote", png) if png else print("no plot: matplotlib is not installed")
    return 1 if any(r["status"] in ("fail", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
