"""pytest-benchmark suite of the LoRA linear: the headline and decode cases of fastpeft.bench, every
implementation, training step (fwd+bwd) and inference forward.

    pytest benchmarks/ --benchmark-only                                  # run, print grouped tables
    pytest benchmarks/ --benchmark-only --benchmark-autosave             # keep the run in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare              # compare against the last saved run

Each implementation passes fastpeft.bench's correctness check before it is timed. pytest-benchmark times
with time.perf_counter, so on CUDA every round ends with a synchronise (and starts from an idle GPU with
L2 flushed for the memory-bound decode cases): figures are per-call latencies. For the full grid, memory
figures and ratios use `python -m fastpeft.bench`.
"""
import functools

import pytest
import torch

from fastpeft.bench import harness
from fastpeft.bench import lora_cases as lc

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    CASES = [
        lc.Case(8192, 4096, 4096, 16, "bf16", 0.1, ("headline",)),
        lc.Case(1, 4096, 4096, 16, "bf16", 0.0, ("decode",)),
        lc.Case(16, 4096, 4096, 16, "bf16", 0.0, ("decode",)),
    ]
    ROUNDS, WARMUP = 100, 10
else:  # CPU figures: small sizes, the PyTorch backend against the baselines
    CASES = [
        lc.Case(256, 512, 512, 16, "fp32", 0.1, ("headline",)),
        lc.Case(1, 512, 512, 16, "fp32", 0.0, ("decode",)),
    ]
    ROUNDS, WARMUP = 10, 2
    torch.set_num_threads(1)  # as the cpu preset of fastpeft.bench: steady figures on a shared machine
METRICS = ("fwd_bwd", "infer")
_checked: dict = {}
_refs: dict = {}  # the reference of each case, shared by its implementations


@functools.lru_cache(maxsize=None)
def _inputs(case: lc.Case) -> lc.Inputs:
    return lc.make_inputs(case, DEVICE, seed=0)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl_name", lc.impl_names(DEVICE))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
def test_lora_linear(benchmark, case, impl_name, metric):
    inp = _inputs(case)
    try:
        impl = lc.build(impl_name, inp, case.dropout)
    except lc.Unavailable as exc:
        pytest.skip(str(exc))
    key = (case.key, impl_name)
    if key not in _checked:  # once per case and implementation, before its first timing
        _checked[key] = lc.footprint_and_check(impl, inp, _refs.setdefault(case.key, {}))[1]
    check = _checked[key]
    assert check["ok"], f"{impl_name} at {case.label}: wrong {check['what']} (worst error ratio {check.get('worst')})"

    flush = harness.l2_flush_buffer(DEVICE) if (DEVICE.type == "cuda" and lc.memory_bound(case)) else None

    def setup():
        harness.reset_grads(impl.grads)
        if flush is not None:
            flush.zero_()
        _sync()

    if metric == "fwd_bwd":
        impl.set_training(True)

        def target():
            impl.forward(inp.x).backward(inp.dy)
            _sync()
    else:
        impl.set_training(False)

        def target():
            with torch.no_grad():
                impl.forward(inp.x)
            _sync()

    benchmark.group = f"{case.label} {metric}"
    benchmark.extra_info.update(case=case.label, impl=impl_name, metric=metric, device=str(DEVICE),
                                l2_flush=flush is not None, description=lc.DESCRIPTIONS.get(impl_name, ""))
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    impl.set_training(True)
    harness.reset_grads(impl.grads)
