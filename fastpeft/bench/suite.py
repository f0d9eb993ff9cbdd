"""pytest-benchmark over the same harness: benchmarks/bench_<op>.py parametrize with params() and call run().

    pytest benchmarks/ --benchmark-only                          # grouped tables, one group per case and metric
    pytest benchmarks/ --benchmark-only --benchmark-autosave     # keep the run in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare      # compare against the last saved run

The cases are the headline and decode cases of the preset for the device (quick on CUDA, cpu without;
$FASTPEFT_BENCH_PRESET overrides). Every implementation passes the harness's float64 check before it is
timed. pytest-benchmark times with time.perf_counter, so on CUDA every round ends with a synchronise (and
starts from an idle GPU, L2 flushed for memory-bound cases): figures are per-call latencies. extra_info
records the case's FLOPs and bytes, the achieved TFLOP/s and GB/s and their fractions of the ceilings.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from . import common, core, get_op, presets
from .ceilings import Ceilings
from .timing import l2_flush_buffer, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("FASTPEFT_BENCH_PRESET") or presets.default_preset(DEVICE)
ROUNDS, WARMUP = (50, 5) if DEVICE.type == "cuda" else (10, 2)
SUITE_METRICS = ("fwd_bwd", "infer", "step", "refresh")


def params(op_name: str, tags=("headline", "decode")) -> list:
    """pytest params (case, impl, metric) of an op: its preset's cases with one of `tags`."""
    op = get_op(op_name)
    out = []
    for case in op.cases(PRESET):
        if not set(case.tags) & set(tags):
            continue
        metrics = [m for m in SUITE_METRICS if m in op.work(case)]
        for name in op.impl_names(case):
            for m in metrics:
                out.append(pytest.param(case, name, m, id=f"{case.label}-{name}-{m}".replace(" ", "_")))
    return out


@functools.lru_cache(maxsize=None)
def _ceilings() -> Ceilings:
    return Ceilings(DEVICE)


@functools.lru_cache(maxsize=None)
def _inputs(op_name: str, case):
    return get_op(op_name).make_inputs(case, DEVICE, 0)


_built: dict = {}


def _impl(op, op_name: str, case, name: str, st):
    """Built and checked once per case and implementation: (impl, check) or (None, skip reason)."""
    key = (op_name, case, name)
    if key not in _built:
        why = core.compile_skip(st, "headline" in case.tags) if name == common.COMPILED else None
        if why:
            _built[key] = (None, why)
        else:
            inp = _inputs(op_name, case)
            try:
                impl = op.build(name, inp, common.BuildOptions(compile_backend=st.compile_backend))
            except common.Unavailable as exc:
                _built[key] = (None, str(exc))
            else:
                impl.run()
                _built[key] = (impl, core.check(op, impl, impl.run(), inp, common.BuildOptions(), {}))
                impl.cleanup()
    return _built[key]


def run(benchmark, op_name: str, case, name: str, metric: str) -> None:
    """Check once, then time one metric of one implementation with benchmark.pedantic."""
    op = get_op(op_name)
    st = presets.Settings.for_preset(PRESET)
    impl, chk = _impl(op, op_name, case, name, st)
    if impl is None:
        pytest.skip(chk)
    assert chk["ok"], f"{name} at {case.label}: wrong {chk['what']} (worst error ratio {chk.get('worst')})"
    if metric not in impl.timers:
        pytest.skip(f"{name} has no {metric} (e.g. inference only)")
    fn, setup = impl.timers[metric]()
    flush = l2_flush_buffer(DEVICE) if (DEVICE.type == "cuda" and core.memory_bound(op, case)) else None

    def before():
        if setup is not None:
            setup()
        if flush is not None:
            flush.zero_()
        synchronize(DEVICE)

    def target():
        fn()
        synchronize(DEVICE)

    benchmark.group = f"{op_name} {case.label} {metric}"
    benchmark.pedantic(target, setup=before, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    impl.cleanup()
    if benchmark.stats is None:  # --benchmark-disable: run once as a test, nothing timed
        return
    flops, nbytes = op.work(case)[metric]
    ceil = _ceilings().measure([case.torch_dtype])
    rates = ceil.rates(case.dtype, flops, nbytes, benchmark.stats.stats.median * 1e3)
    benchmark.extra_info.update(op=op_name, case=case.label, impl=name, metric=metric, device=str(DEVICE),
                                l2_flush=flush is not None, description=op.DESCRIPTIONS.get(name, ""), flops=flops,
                                bytes=nbytes, **rates, ceilings=ceil.as_dict())


__all__ = ["params", "run", "DEVICE", "PRESET"]
