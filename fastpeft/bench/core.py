"""The run loop every op shares: build each implementation on a case's shared inputs, check it against the
float64 reference, measure its memory, time its metrics, and turn times into TFLOP/s and GB/s.

An op is a module of fastpeft.bench read through opspec.OpSpec (opspec's docstring lists what it defines);
every public function here takes the module or its OpSpec.
"""
from __future__ import annotations

import gc
import math
import time
from typing import Callable

import torch

from . import common, opspec, tolerances
from .memory import measure, free_bytes
from .timing import host_us, time_fn
from .tolerances import error_ratio

RIDGE_FLOP_PER_BYTE = 300.0  # H100/H200 bf16: ~990 TFLOP/s over ~3.4-4.8 TB/s


def result(case, name: str, status: str, reason: str = "", **kw) -> dict:
    return {"case": case.as_dict(), "impl": name, "status": status, "reason": reason, **kw}


def memory_bound(op, case) -> bool:
    """Whether the case's main metric moves more bytes than its FLOPs can hide (a warm L2 would flatter it)."""
    op = opspec.of(op)
    flops, nbytes = op.work(case)[op.main_metric(case)]
    return flops / max(nbytes, 1) < RIDGE_FLOP_PER_BYTE


def compare(outputs: dict, ref: dict, dtype: torch.dtype, k: int | None = None) -> dict:
    """Every named result against the reference, with the tolerance of `dtype` for an accumulation length
    `k` (tolerances.py); a missing (None) result fails."""
    worst, what = 0.0, ""
    for name, v in outputs.items():
        if name not in ref:
            raise KeyError(f"result {name!r} has no reference (reference has {sorted(ref)})")
        e = math.inf if v is None else error_ratio(v, ref[name], dtype, k)
        if not e <= worst:
            worst, what = e, name
    return {"ok": bool(outputs) and worst <= 1.0, "worst": worst if math.isfinite(worst) else None, "what": what,
            "compared": sorted(outputs)}


def finite_with_shapes(outputs: dict, ref: dict) -> dict:
    for k, v in outputs.items():
        if v is None or tuple(v.shape) != tuple(ref[k].shape) or not bool(torch.isfinite(v).all()):
            return {"ok": False, "worst": None, "what": k, "compared": sorted(outputs)}
    return {"ok": bool(outputs), "worst": None, "what": "", "compared": sorted(outputs)}


def check(op, impl: common.Impl, outputs: dict, inp, opts: common.BuildOptions, ref_cache: dict) -> dict:
    """The timed instance's results against the reference; where the case is not deterministic (dropout),
    shapes and finiteness of the timed instance and the same implementation built exact vs the reference."""
    op, case = opspec.of(op), inp.case
    k = op.accumulation(case)
    row = tolerances.row(case.torch_dtype, inp.device)
    used = {"row": row, "k": k, "bound": tolerances.bound(row, k)}  # recorded with the check

    def ref(kind):
        if kind not in ref_cache:
            ref_cache[kind] = op.reference(inp, kind)
        return ref_cache[kind]

    if not op.needs_twin(case):
        return dict(compare(outputs, ref(impl.ref), case.torch_dtype, k),
                    mode="every result vs the float64 reference", tolerance=used)
    res = finite_with_shapes(outputs, ref(impl.ref))
    if res["ok"]:
        twin = op.build(impl.name, inp, common.BuildOptions(exact=True, compile_backend=opts.compile_backend))
        res = compare(twin.run(), ref(twin.ref), case.torch_dtype, k)
        twin.cleanup()
    res["mode"] = ("random (dropout): finite with the right shapes; the same implementation without it vs the "
                   "float64 reference")
    res["tolerance"] = used
    return res


def _time_metrics(op, impl: common.Impl, inp, st, flush: bool) -> dict:
    wanted = st.metrics or op.METRICS
    out = {}
    for m in op.METRICS:
        if m in wanted and m in impl.timers:
            fn, setup = impl.timers[m]()
            out[m] = time_fn(fn, inp.device, setup=setup, flush_l2=flush, **st.timing_kwargs())
    impl.cleanup()
    return out


HOST_METRICS = ("infer", "fwd_bwd")  # the metrics whose host overhead per call is reported


def host_overhead(op, name: str, tiny_inp, st) -> dict:
    """CPU µs per call of the implementation on the case's tiny twin (op.tiny): its host overhead, for the
    metrics in HOST_METRICS. torch.compile is not rebuilt for it (tens of seconds per case)."""
    op = opspec.of(op)
    if tiny_inp is None or name == common.COMPILED:
        return {}
    try:
        impl = op.build(name, tiny_inp, common.BuildOptions(compile_backend=st.compile_backend))
    except common.Unavailable:
        return {}
    out = {}
    for m in HOST_METRICS:
        if m in impl.timers and (not st.metrics or m in st.metrics):
            fn, setup = impl.timers[m]()
            out[m] = host_us(fn, tiny_inp.device, setup=setup)
    impl.cleanup()
    return out


def run_impl(op, name: str, inp, st, ceilings, ref_cache: dict, tiny_inp=None) -> dict:
    """Build, check, measure memory and time one implementation on one case's inputs (and its host overhead
    on tiny_inp, the case's tiny twin, when given)."""
    op, case = opspec.of(op), inp.case
    opts = common.BuildOptions(compile_backend=st.compile_backend)
    try:
        impl = op.build(name, inp, opts)
    except common.Unavailable as exc:
        return result(case, name, "skip", str(exc))
    impl.run()  # warm-up: compilation and autotuning allocate; keep them out of the memory figure
    impl.cleanup()
    fp = measure(impl.run, inp.device, impl.inputs)
    chk = check(op, impl, fp.output, inp, opts, ref_cache)
    impl.cleanup()
    res = result(case, name, "ok" if chk["ok"] else "fail", "" if chk["ok"] else f"check failed on {chk['what']}",
                 check=chk, peak_bytes=fp.peak_bytes, saved_bytes=fp.saved.total_bytes,
                 saved_beyond_inputs_bytes=fp.saved.beyond_inputs_bytes, saved_beyond_inputs=fp.saved.beyond_inputs,
                 notes=impl.notes)
    del fp
    if not chk["ok"]:
        return res  # a wrong implementation is not timed
    flush = st.flush == "always" or (st.flush == "auto" and inp.device.type == "cuda" and memory_bound(op, case))
    times = _time_metrics(op, impl, inp, st, flush)
    work = op.work(case)
    res.update(l2_flush=flush, times_ms={k: t.median_ms for k, t in times.items()},
               timing={k: t.as_dict() for k, t in times.items()},
               work={k: {"flops": work[k][0], "bytes": work[k][1]} for k in times},
               rates={k: ceilings.rates(case.dtype, *work[k], t.median_ms) for k, t in times.items()},
               host_us=host_overhead(op, name, tiny_inp, st))
    return res


def compile_skip(st, first: bool) -> str | None:
    """Why the torch.compile baseline is not timed on a case (None: it is). Policy "headline": only on the
    op's first case where it applies, because compiling costs tens of seconds per case."""
    if st.compile == "all" or (st.compile == "headline" and first):
        return None
    where = "no case" if st.compile == "none" else "each op's first case only"
    return f"torch.compile is timed on {where} in this run (--compile all to time it here)"


def _first_compiled(cases: list, names_of: Callable) -> set:
    """Indices of the cases whose compiled baseline the "headline" policy times."""
    first = next((i for i, c in enumerate(cases) if common.COMPILED in names_of(c)), None)
    return set() if first is None else {first}


def run_case(op, case, names: list[str], device: torch.device, st, ceilings,
             on_result: Callable[[dict], None] | None = None, first_compiled: bool = False) -> list[dict]:
    """Every implementation on one case's fresh inputs; a failure of one never stops the others.
    first_compiled: whether this is the op's first case with a compiled baseline (the "headline" policy)."""
    op, results = opspec.of(op), []

    def emit(r):
        results.append(r)
        if on_result:
            on_result(r)

    avail, need = free_bytes(device), op.bytes_needed(case)
    if avail is not None and need > 0.9 * avail:
        for n in names:
            emit(result(case, n, "skip", f"needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free"))
        return results
    inp = op.make_inputs(case, device, st.seed)
    tiny = op.tiny(case)
    tiny_inp = None if tiny is None else op.make_inputs(tiny, device, st.seed)
    ref_cache: dict = {}
    for n in names:
        why = compile_skip(st, first_compiled) if n == common.COMPILED else None
        if why:
            emit(result(case, n, "skip", why))
            continue
        try:
            emit(run_impl(op, n, inp, st, ceilings, ref_cache, tiny_inp))
        except torch.cuda.OutOfMemoryError as exc:
            emit(result(case, n, "skip", f"out of memory: {str(exc).splitlines()[0]}"))
        except Exception as exc:  # recorded, and the run goes on: one broken implementation must not hide the rest
            emit(result(case, n, "error", f"{type(exc).__name__}: {exc}"))
    del inp, tiny_inp, ref_cache
    if device.type == "cuda":  # on CUDA only: a full collection costs ~0.5 s once transformers is imported
        gc.collect()
        torch.cuda.empty_cache()
    return results


def run_op(op, cases: list, names_of: Callable, device: torch.device, st, ceilings, *, deadline: float | None = None,
           on_case: Callable | None = None) -> list[dict]:
    """Every case of an op in order; cases not started by `deadline` (time.monotonic) are recorded as skipped."""
    op, results = opspec.of(op), []
    first = _first_compiled(cases, names_of)
    for i, case in enumerate(cases):
        names = names_of(case)
        if not names:  # none of the chosen implementations applies to this case (e.g. --impl compiled, a refresh)
            continue
        if deadline is not None and time.monotonic() > deadline:
            res = [result(case, n, "skip", "the run's time budget was spent before this case") for n in names]
        else:
            res = run_case(op, case, names, device, st, ceilings, first_compiled=i in first)
        results += res
        if on_case:
            on_case(case, res, results)
    return results


def estimate_seconds(op, cases: list, names_of: Callable, st, device: torch.device) -> float:
    """A rough run time from the cases' FLOPs and bytes at nominal rates (~60% of an H100's bf16 peak on
    CUDA, ~20 GFLOP/s on one CPU thread), plus warm-up, checks and compilation."""
    op, total = opspec.of(op), 0.0
    cuda = device.type == "cuda"
    first = _first_compiled(cases, names_of)
    for i, c in enumerate(cases):
        names = names_of(c)
        e = c.torch_dtype.itemsize
        rate = ({2: 600e12, 4: 50e12}[e] if cuda else 2e10)
        bw, overhead = (2.5e12, 1e-4) if cuda else (1e10, 3e-4)
        work = op.work(c)
        per = {m: max(f / rate, b / bw) + 3e-5 for m, (f, b) in work.items()}
        metrics = [m for m in op.METRICS if m in per and (not st.metrics or m in st.metrics)]
        for m in metrics:
            t = per[m]
            n = max(st.min_reps, min(st.max_reps, int(st.rep_ms / 1e3 / t)))
            total += len(names) * (st.warmup_ms / 1e3 + 4 * t + n * (t + overhead))
        total += len(names) * 3 * sum(per.values()) + 0.2
        if cuda:
            total += 2.0 * sum("triton" in n for n in names)  # Triton compilation, per case
            if common.COMPILED in names and compile_skip(st, i in first) is None:
                total += 25.0 * (2 if op.needs_twin(c) else 1)  # inductor, training and inference graphs
    return total


__all__ = ["run_op", "run_case", "run_impl", "check", "compare", "memory_bound", "estimate_seconds", "result",
           "compile_skip"]
