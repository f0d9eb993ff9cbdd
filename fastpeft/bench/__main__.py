"""python -m fastpeft.bench: time fastpeft's ops against their baselines after checking every result against
a float64 reference; print tables with TFLOP/s and GB/s as fractions of the device's GEMM and copy ceilings
(measured in the same run); write <out>/<date>_<device>_<op>.json and a PNG plot per op.

    python -m fastpeft.bench all                    # every op, quick preset on a GPU, cpu preset without one
    python -m fastpeft.bench lora --preset full     # one op's full grid
    python -m fastpeft.bench lora --case m=1,16 --case r=8,64 --dtype fp16   # a cross product around the headline
    python -m fastpeft.bench all --list --device cuda --preset full          # the cases and a run-time estimate
    python -m fastpeft.bench --summarize benchmarks/results/<file>.json --markdown
    python -m fastpeft.bench model --preset cpu     # a whole Llama training step (fastpeft.bench.model)
    python -m fastpeft.bench comm                   # bytes all-reduced per data-parallel step (fastpeft.bench.comm)

Exit status 1 when an implementation fails its correctness check or raises.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from . import OPS, common, core, get_op, opspec, presets, report, schema
from .. import autotune
from .ceilings import Ceilings


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def _case_arg(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"expected KEY=V1[,V2...] such as m=1,16, got {text!r}")
    return key.strip(), [v.strip() for v in values.split(",")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastpeft.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", default="all", choices=[*OPS, "all"], help="the op to benchmark (default all)")
    p.add_argument("--preset", choices=sorted(presets.PRESETS), help="quick (default on a GPU), full, cpu (default "
                   "without one), smoke (tiny, for tests)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--case", type=_case_arg, action="append", default=[], metavar="KEY=V1,V2",
                   help="replace the preset's cases by the cross product of these values around the headline case")
    p.add_argument("--m", type=_positive, nargs="+", help="shorthand for --case m=...")
    p.add_argument("--dtype", choices=sorted(presets.DTYPES), nargs="+",
                   help="default: the preset's (bf16; fp32 for cpu)")
    p.add_argument("--impl", nargs="+",
                   help="only these implementations (names or families: floor eager compiled fastpeft ...)")
    p.add_argument("--exclude", nargs="+", default=[],
                   help="leave these implementations out (e.g. peft: its import takes ~10 s)")
    p.add_argument("--backend", nargs="+", default=list(opspec.BACKENDS), choices=list(opspec.BACKENDS),
                   help="fastpeft backends to time where they can run (auto: the op's measured choice, for the ops "
                        "that measure)")
    p.add_argument("--metrics", nargs="+", choices=report.METRIC_ORDER)
    p.add_argument("--compile", choices=presets.COMPILE_POLICIES,
                   help="cases that time torch.compile: none, headline (each op's first case) or all "
                        "(default: the preset's)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--warmup-ms", type=float)
    p.add_argument("--rep-ms", type=float, help="time to fill with repetitions, per implementation and metric")
    p.add_argument("--min-reps", type=_positive)
    p.add_argument("--max-reps", type=_positive)
    p.add_argument("--flush", choices=["auto", "always", "never"], default="auto",
                   help="flush L2 before each repetition: auto = for memory-bound cases on CUDA")
    p.add_argument("--threads", type=_positive, help="CPU threads for torch (default: the preset's on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, help="seconds for the whole run, shared among the ops; cases not "
                   "started within an op's share are recorded as skipped")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON and PNG files")
    p.add_argument("--tag", help="appended to the file names: <date>_<device>_<op>_<tag>.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--list", action="store_true", help="print the cases and the estimated run time, run nothing")
    p.add_argument("--summarize", metavar="JSON", help="print the tables of an existing result file and exit")
    p.add_argument("--markdown", action="store_true", help="with --summarize: markdown tables for RESULTS.md")
    p.add_argument("--only-tags", nargs="+", help="with --markdown: only cases tagged so (headline, decode, ...)")
    return p


def _convert(op, field: str, value: str, like):
    try:
        if isinstance(like, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return type(like)(value)
    except ValueError:
        raise SystemExit(f"--case {field}: expected {type(like).__name__} values for op {op.NAME}, "
                         f"got {value!r}") from None


def plan_cases(op, preset: str, args) -> list:
    """The preset's cases, or the cross product of --case/--m values around the headline; --dtype applied."""
    raw = dict(args.case)
    if args.m:
        raw["m"] = [str(v) for v in args.m]
    if raw:
        h = op.headline(preset)
        fields = {f.name for f in dataclasses.fields(h)} - {"tags"}
        bad = sorted(set(raw) - fields)
        if bad:
            raise SystemExit(f"--case {bad[0]}: op {op.NAME} has no such case field (expected one of {sorted(fields)})")
        cases = common.cross(h, {k: [_convert(op, k, v, getattr(h, k)) for v in vs] for k, vs in raw.items()})
    else:
        cases = op.cases(preset)
    if args.dtype:
        cases = common.dedupe([dataclasses.replace(c, dtype=dt) for dt in args.dtype for c in cases])
    return cases


def _family(name: str) -> str:
    return "fastpeft" if name.startswith("fastpeft[") and name[9:-1] in ("torch", "triton", "cuda") else name


def impl_filter(op, args):
    """names_of(case): the op's implementations for a case after --impl/--exclude (the floor always stays)."""
    def chosen(n):
        if n in args.exclude or _family(n) in args.exclude:
            return False
        return not args.impl or n in args.impl or _family(n) in args.impl or n == op.FLOOR

    return lambda case: [n for n in op.impl_names(case, tuple(args.backend)) if chosen(n)]


def _check_names(ops, args) -> None:
    known = {n for op in ops for n in [*op.IMPLS, *op.DESCRIPTIONS]} | {"fastpeft"}
    for flag, names in (("--impl", args.impl or []), ("--exclude", args.exclude)):
        for n in names:
            if n not in known:
                raise SystemExit(f"{flag}: expected implementations of {', '.join(o.NAME for o in ops)} "
                                 f"({', '.join(sorted(known))}), got {n!r}")


def summarize(path: str, as_markdown: bool, only_tags=None) -> int:
    doc = schema.load(path)
    main_impl = doc.get("settings", {}).get("main_impl")
    print(report.markdown(doc, main_impl, only_tags) if as_markdown else "", end="")
    if not as_markdown:
        report.print_report(doc, main_impl)
    return 0


def run_one(op, cases, names_of, device, st, ceilings, meta, base_settings: dict, args, deadline) -> list[dict]:
    main_impl = common.main_impl(device, op)
    reasons = common.backend_reasons(device, has_cuda_kernels=op.HAS_CUDA_KERNELS, has_cublas=op.HAS_CUBLAS,
                                     has_auto=op.HAS_AUTO)
    settings = dict(base_settings, impls=sorted({n for c in cases for n in names_of(c)}), main_impl=main_impl,
                    descriptions=op.DESCRIPTIONS, fastpeft_backends=reasons,
                    estimated_s=round(core.estimate_seconds(op, cases, names_of, st, device), 1))
    path = os.path.join(args.out, schema.file_stem(meta, op.NAME, args.tag) + ".json")
    t0 = time.monotonic()
    print(f"\n#### {op.NAME}: {len(cases)} cases, estimated {settings['estimated_s']:.0f} s", flush=True)

    def on_case(case, res, results):
        for r in res:
            r["main_metric"] = op.main_metric(case)
        report.print_case(case.label, {r["impl"]: r for r in res}, op.FLOOR, main_impl)
        if not args.no_json:
            settings["elapsed_s"] = round(time.monotonic() - t0, 1)
            schema.write_json(schema.document(op.NAME, op.FLOOR, meta, settings, ceilings.as_dict(), results), path)

    results = core.run_op(op, cases, names_of, device, st, ceilings, deadline=deadline, on_case=on_case)
    settings["elapsed_s"] = round(time.monotonic() - t0, 1)
    settings["autotune"] = autotune.report()  # what auto measured and chose (backends, GEMM configs), with timings
    settings["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc = schema.document(op.NAME, op.FLOOR, meta, settings, ceilings.as_dict(), results)
    print()
    print(report.summary_text(doc, main_impl))
    if not args.no_json:
        print("wrote", schema.write_json(doc, path))
        if not args.no_plot:
            png = report.plot(doc, path[:-5] + ".png")
            print("wrote", png) if png else print("no plot: matplotlib is not installed")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["model"]:  # the whole-model benchmark has its own options
        from . import model

        return model.main(argv[1:])
    if argv[:1] == ["comm"]:  # data-parallel bytes per step, counted and on paper
        from . import comm

        return comm.main(argv[1:])
    args = parser().parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.markdown, args.only_tags)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or presets.default_preset(device)
    ops = [get_op(n) for n in (OPS if args.op == "all" else [args.op])]
    _check_names(ops, args)
    try:
        st = presets.Settings.for_preset(
            preset, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, min_reps=args.min_reps, max_reps=args.max_reps,
            flush=args.flush, metrics=tuple(args.metrics) if args.metrics else None, seed=args.seed,
            compile=args.compile, compile_backend=args.compile_backend, backends=tuple(args.backend))
    except ValueError as exc:
        raise SystemExit(f"--{str(exc).split(':')[0].replace('_', '-')}: {exc}") from None
    plan = [(op, plan_cases(op, preset, args), impl_filter(op, args)) for op in ops]
    if args.list:  # no device needed: estimate a GPU run from a CPU machine with --device cuda
        total = 0.0
        for op, cases, names_of in plan:
            est = core.estimate_seconds(op, cases, names_of, st, device)
            total += est
            print(f"{op.NAME}, preset {preset} on {device.type}: {len(cases)} cases, estimated {est:.0f} s")
            for c in cases:
                print(f"  {c.label}  [{', '.join(c.tags)}]  {' '.join(names_of(c))}")
        print(f"total estimated {total:.0f} s plus imports and compilation")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    threads = args.threads or (presets.PRESETS[preset].get("threads") if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    meta = schema.environment(device)
    print(report.device_banner(meta), flush=True)
    ceilings = Ceilings(device).measure({c.torch_dtype for _, cases, _ in plan for c in cases})
    print(report.ceilings_line(ceilings.as_dict()), flush=True)
    base = {"preset": preset, **st.as_dict(), "time_budget_s": args.time_budget,
            "method": ("CUDA events, synchronised before each repetition, median after warm-up" if device.type == "cuda"
                       else "time.perf_counter median after warm-up")}
    t_start, results = time.monotonic(), []
    est = [max(core.estimate_seconds(op, cases, names_of, st, device), 1.0) for op, cases, names_of in plan]
    for i, (op, cases, names_of) in enumerate(plan):
        deadline = None
        if args.time_budget is not None:  # each op gets its estimate's share of what is left: none starves the rest
            left = args.time_budget - (time.monotonic() - t_start)
            deadline = time.monotonic() + left * est[i] / sum(est[i:])
        results += run_one(op, cases, names_of, device, st, ceilings, meta, base, args, deadline)
    print(f"\nelapsed {time.monotonic() - t_start:.0f} s")
    return 1 if any(r["status"] in ("fail", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
