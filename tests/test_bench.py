"""The benchmark harness on the CPU, for every op: the CLI end to end (schema, metadata, ceilings, rates),
the correctness check refusing a wrong result, the torch.compile baseline, presets and the measurement
primitives. No timing figure is asserted here (performance claims come from benchmarks)."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from fastpeft.bench import OPS, common, core, get_op, presets, report, schema, timing
from fastpeft.bench import lora as lb
from fastpeft.bench.__main__ import main as bench_main
from fastpeft.bench.ceilings import Ceilings
from fastpeft.bench.memory import SavedTensors, measure
from fastpeft.bench.tolerances import DEFAULT_K, TOLERANCES, error_ratio, row, tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None  # the qlora op's implementations skip without it
CPU = torch.device("cpu")
FAST = presets.Settings.for_preset("smoke")
OUTPUTS = {  # every result each op's fastpeft implementation is checked on, per kind of case
    ("lora", None): ("y", "dx", "da", "db"),
    ("adapter", None): ("y", "dh", "d_down_w", "d_down_b", "d_up_w", "d_up_b"),
    ("ia3", None): ("y", "dx", "dl"),
    ("multi-lora", None): ("y", "dx", "da", "db"),
    ("dora", None): ("y", "dx", "da", "db", "dm"),
    ("qlora", None): ("y", "dx", "da", "db"),
    ("galore", "layer"): ("y", "dx", "r"),
    ("galore", "step"): ("dw", "exp_avg", "exp_avg_sq"),
    ("galore", "refresh"): ("energy",),
}


def _strict_json(path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=bad)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `python -m fastpeft.bench all --preset smoke` run (peft left out: its import alone takes ~10 s
    here; test_peft_baselines covers it)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "fastpeft.bench", "all", "--preset", "smoke", "--device", "cpu", "--exclude", "peft",
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    docs = {}
    for op in OPS:
        names = [f for f in os.listdir(out) if re.fullmatch(rf"\d{{4}}-\d{{2}}-\d{{2}}_cpu_{op}\.json", f)]
        assert len(names) == 1, (op, sorted(os.listdir(out)))
        docs[op] = _strict_json(out / names[0])
    return out, docs, proc.stdout


def test_cli_writes_one_schema_for_every_op(cli_run):
    out, docs, stdout = cli_run
    assert "CPU figures" in stdout and "ceilings measured in this run" in stdout
    for op, doc in docs.items():
        assert doc["schema"] == schema.SCHEMA and doc["op"] == op
        meta = doc["meta"]
        for key in ("date", "command", "device_type", "device_name", "torch", "triton", "cuda", "peft", "git_commit"):
            assert key in meta, (op, key)
        assert meta["device_type"] == "cpu" and meta["torch"] == torch.__version__ and meta["cuda"] is None
        assert "fastpeft.bench all" in meta["command"] and "--preset smoke" in meta["command"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", meta["date"])
        assert meta["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"])
        ceil = doc["ceilings"]
        assert ceil["gemm_tflops"]["fp32"] > 0 and ceil["copy_gbps"] > 0
        assert doc["settings"]["preset"] == "smoke" and doc["settings"]["main_impl"] == "fastpeft[torch]"
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            continue
        png = [f for f in os.listdir(out) if f.endswith(f"_cpu_{op}.png")]
        assert len(png) == 1 and os.path.getsize(out / png[0]) > 1000, (op, png)


def test_cli_results_are_checked_timed_and_rated(cli_run):
    _, docs, _ = cli_run
    for op, doc in docs.items():
        ceil = doc["ceilings"]
        if op == "qlora" and not HAS_BNB:
            continue
        for label, impls in schema.by_case(doc["results"]).items():
            main = impls.get("fastpeft[torch]") or impls["fastpeft[randomized]"]
            assert main["status"] == "ok", (op, label, main["reason"])
            if "fastpeft[triton]" in impls:
                assert impls["fastpeft[triton]"]["status"] == "skip" and impls["fastpeft[triton]"]["reason"]
            assert sum(r["status"] == "ok" and not n.startswith("fastpeft") for n, r in impls.items()) >= 1, (op, label)
            if "compiled" in impls:
                assert impls["compiled"]["status"] == "skip" and "torch.compile" in impls["compiled"]["reason"]
            for name, r in impls.items():
                assert r["status"] in ("ok", "skip"), (op, label, name, r["reason"])
                if r["status"] != "ok":
                    continue
                assert r["check"]["ok"] and r["check"]["worst"] <= 1.0 and r["check"]["compared"], (op, name)
                assert r["main_metric"] in r["times_ms"], (op, name)
                for m, t in r["times_ms"].items():
                    assert math.isfinite(t) and t > 0
                    rt, w = r["rates"][m], r["work"][m]
                    assert w["flops"] > 0 and w["bytes"] > 0
                    assert rt["tflops"] == pytest.approx(w["flops"] / (t * 1e-3) / 1e12)
                    assert rt["gbps"] == pytest.approx(w["bytes"] / (t * 1e-3) / 1e9)
                    assert rt["gemm_frac"] == pytest.approx(rt["tflops"] / ceil["gemm_tflops"]["fp32"])
                    assert rt["copy_frac"] == pytest.approx(rt["gbps"] / ceil["copy_gbps"])


def test_cli_lora_memory_and_ratios(cli_run):
    _, docs, _ = cli_run
    doc = docs["lora"]
    by = {(r["impl"], r["case"]["dropout"]): r for r in doc["results"]}
    m, k, r_ = 7, 40, 3
    assert by[("floor", 0.1)]["saved_beyond_inputs_bytes"] == 0
    assert by[("eager", 0.1)]["saved_beyond_inputs_bytes"] >= 2 * m * k + m * r_ * 4  # dropout mask and dropout(x)
    # the issue's target for fastpeft: nothing [M, in]-sized beyond x itself
    big = [t for t in by[("fastpeft[torch]", 0.1)]["saved_beyond_inputs"] if math.prod(t["shape"]) >= m * k]
    assert big == [], big
    res, floor = by[("fastpeft[torch]", 0.1)], by[("floor", 0.1)]
    e = {(e["impl"], e["case"]): e for e in doc["ratios"]}[("fastpeft[torch]", res["case"]["label"])]
    assert e["vs_floor"]["fwd_bwd"] == pytest.approx(res["times_ms"]["fwd_bwd"] / floor["times_ms"]["fwd_bwd"])
    assert e["speedup"]["eager"]["fwd"] == pytest.approx(by[("eager", 0.1)]["times_ms"]["fwd"] / res["times_ms"]["fwd"])
    assert "floor" not in e["speedup"] and "fastpeft[triton]" not in e["speedup"]


def test_cli_reports_host_overhead_on_tiny_twins(cli_run):
    """Issue 14: host µs per call (CPU time on the case's tiny twin) for every implementation that has one."""
    _, docs, stdout = cli_run
    assert "host µs infer" in stdout and "host µs fwd+bwd" in stdout
    for op in ("lora", "adapter", "ia3", "multi-lora"):
        for r in docs[op]["results"]:
            if r["status"] == "ok" and r["impl"] != "compiled":
                host = r["host_us"]
                assert set(host) <= {"infer", "fwd_bwd"} and host, (op, r["impl"])
                assert all(math.isfinite(v) and v > 0 for v in host.values()), (op, r["impl"], host)
    tiny = get_op("lora").tiny(lb.cases("cpu")[0])
    assert (tiny.m, tiny.in_features, tiny.out_features, tiny.r) == (1, 16, 16, 4) and tiny.dropout == 0.1


def test_summarize_prints_markdown_of_new_and_old_files(cli_run, capsys):
    out, docs, _ = cli_run
    name = [f for f in os.listdir(out) if f.endswith("_galore.json")][0]
    assert bench_main(["--summarize", str(out / name), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| impl | check |" in text and "step TFLOP/s (GEMM)" in text and "fastpeft[randomized]" in text
    old = os.path.join(ROOT, "benchmarks", "results", "2026-11-22_cpu.json")  # schema 1, kept readable
    assert bench_main(["--summarize", old]) == 0
    text = capsys.readouterr().out
    assert "ceilings: not measured (old schema)" in text and "fastpeft[torch]" in text


def _smoke_case(op, kind=None):
    return next(c for c in op.cases("smoke") if kind is None or c.kind == kind)


def _fastpeft(op, case) -> str:
    """The fastpeft implementation that runs on the CPU for a case."""
    return next(n for n in op.impl_names(case) if n in ("fastpeft[torch]", "fastpeft[randomized]"))


_GOOD: dict = {}


@pytest.mark.parametrize("op_name,kind,key", [(o, k, key) for (o, k), keys in OUTPUTS.items() for key in keys])
def test_check_refuses_a_wrong_result(monkeypatch, op_name, kind, key):
    """Every result of every op is compared: a 5% error in any one of them fails the check, and a failing
    implementation is not timed. The unperturbed run passes (so the test can fail both ways)."""
    if op_name == "qlora" and not HAS_BNB:
        pytest.skip("bitsandbytes does not import: the qlora op's implementations skip")
    op = get_op(op_name)
    case = _smoke_case(op, kind)
    name = _fastpeft(op, case)
    if (op_name, kind) not in _GOOD:  # once per op and kind of case
        _GOOD[(op_name, kind)] = core.run_case(op, case, [name], CPU, FAST, Ceilings(CPU))[0]
    good = _GOOD[(op_name, kind)]
    assert good["status"] == "ok" and key in good["check"]["compared"], good
    real = op.build

    def wrong(name, inp, opts):
        impl = real(name, inp, opts)
        run = impl.run
        impl.run = lambda: {k: v * 1.05 if k == key else v for k, v in run().items()}
        return impl

    monkeypatch.setattr(op, "build", wrong)
    bad = core.run_case(op, case, [name], CPU, FAST, Ceilings(CPU))[0]
    assert bad["status"] == "fail" and bad["check"]["what"] == key, bad
    assert "times_ms" not in bad


def test_check_catches_a_wrong_baseline(monkeypatch):
    """A realistic bug (a LoRA scaling off by 1.5x) is caught in the baseline, and the floor still runs."""
    case = lb.Case(5, 24, 40, 4, "fp32", 0.0)
    real = lb.EagerLoRA.forward
    monkeypatch.setattr(lb.EagerLoRA, "forward",
                        lambda self, x: real(self, x) + 0.5 * (real(self, x) - self.base_layer(x)))
    by = {r["impl"]: r for r in core.run_case(lb, case, ["floor", "eager"], CPU, FAST, Ceilings(CPU))}
    assert by["floor"]["status"] == "ok"
    assert by["eager"]["status"] == "fail" and by["eager"]["check"]["worst"] > 1.0


@pytest.mark.parametrize("op_name,kind", [("lora", None), ("adapter", None), ("ia3", None), ("multi-lora", None),
                                          ("galore", "step")])
def test_compiled_baseline_runs_and_passes_the_check(op_name, kind):
    """torch.compile of the eager version for every op (aot_eager here: inductor takes ~20 s a graph on this CPU)."""
    op = get_op(op_name)
    case = dataclasses.replace(_smoke_case(op, kind), tags=("headline",))
    st = dataclasses.replace(FAST, compile="headline", compile_backend="aot_eager")
    res = core.run_case(op, case, ["compiled"], CPU, st, Ceilings(CPU), first_compiled=True)[0]
    assert res["status"] == "ok" and res["check"]["ok"], res
    assert set(res["times_ms"]) == set(core.run_case(op, case, ["eager"], CPU, st, Ceilings(CPU))[0]["times_ms"])
    skip = core.run_case(op, case, ["compiled"], CPU, st, Ceilings(CPU))[0]
    assert skip["status"] == "skip" and "first case only" in skip["reason"]


def test_peft_baselines():
    pytest.importorskip("peft", reason="peft is not installed: the HF PEFT baselines are skipped")
    for case in lb.cases("smoke"):  # p = 0.1 and p = 0
        res = core.run_case(lb, case, ["peft"], CPU, FAST, Ceilings(CPU))[0]
        assert res["status"] == "ok" and res["check"]["ok"], res
        if case.dropout > 0:  # PEFT's dropout stores dropout(x) (and a mask): more than x·Aᵀ
            assert res["saved_beyond_inputs_bytes"] > case.m * case.in_features * 4
    ml = get_op("multi-lora")
    res = core.run_case(ml, _smoke_case(ml), ["peft"], CPU, FAST, Ceilings(CPU))[0]
    assert res["status"] == "ok" and res["check"]["compared"] == ["y"] and set(res["times_ms"]) == {"infer"}, res


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--preset", "huge"], ["lora2"], ["--case", "m"], ["--m", "0"]):
        with pytest.raises(SystemExit) as exc:
            bench_main(argv + ["--list"])
        assert exc.value.code == 2, argv
    for argv, msg in ((["lora", "--case", "width=3"], "--case width"), (["lora", "--case", "m=x"], "--case m"),
                      (["--impl", "lora2"], "--impl"), (["--exclude", "nope"], "--exclude"),
                      (["lora", "--min-reps", "5", "--max-reps", "2"], "max")):
        with pytest.raises(SystemExit, match=msg):
            bench_main(argv + ["--list"])


def test_list_and_case_overrides(capsys):
    assert bench_main(["lora", "--list", "--preset", "full", "--case", "m=1,16", "--case", "r=8,64", "--dtype",
                       "fp16"]) == 0
    text = capsys.readouterr().out
    labels = re.findall(r"M=(\d+) 4096x4096 r=(\d+) fp16 p=0.1", text)
    assert sorted(labels) == [("1", "64"), ("1", "8"), ("16", "64"), ("16", "8")], text


def test_quick_presets_fit_the_gpu_session():
    """gpu_session.sh runs every op's quick preset in one call next to the CUDA tests: the modelled time
    (timing, checks, compilation) must leave room for imports and Triton compilation."""
    st = presets.Settings.for_preset("quick")
    script = open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_session.sh")).read()
    backends = tuple(re.search(r'^GPU_BACKENDS="([^"]+)"', script, re.M).group(1).split())
    total = 0.0
    for name in OPS:
        op = get_op(name)
        total += core.estimate_seconds(op, op.cases("quick"), lambda c, op=op: op.impl_names(c, backends), st,
                                       torch.device("cuda"))
    assert total < 210, total


@pytest.mark.parametrize("name", list(OPS))
def test_presets_of_every_op(name):
    op = get_op(name)
    for preset in presets.PRESETS:
        cases = op.cases(preset)
        assert cases and "headline" in cases[0].tags, (name, preset)
        assert len({c.key for c in cases}) == len(cases) and len({c.label for c in cases}) == len(cases)
        dt = presets.PRESETS[preset]["dtype"]
        assert all(c.dtype == dt for c in cases), (name, preset)
        for c in cases:
            assert set(op.work(c)) >= {op.main_metric(c)} and op.bytes_needed(c) > 0
            assert all(n in op.DESCRIPTIONS for n in op.impl_names(c))


def test_lora_full_preset_covers_the_issue_grid():
    full = lb.cases("full")
    head = full[0]
    assert head.key == (8192, 4096, 4096, 16, "bf16", 0.1)
    assert full[1].key == (1, 4096, 4096, 16, "bf16", 0.0) and "decode" in full[1].tags
    assert {c.m for c in full} == {1, 16, 128, 2048, 8192, 16384}
    assert {(c.in_features, c.out_features) for c in full} == set(lb._WIDTHS)
    assert {c.r for c in full} == {8, 16, 64, 128} and {c.dropout for c in full} == {0.0, 0.1}


def test_tolerance_table_is_the_tests_table():
    """One table: tests/tolerances.py imports the harness's, it does not copy it."""
    import tolerances as tests_tol  # tests/ is on sys.path (rootdir conftest), as for every test module

    assert tests_tol.tol is tol and tests_tol.TOLERANCES is TOLERANCES


def test_tolerances_follow_the_derivation():
    """C·(u_op + u_acc·sqrt(K) + u_out) per row; the row from the device and torch's matmul precision."""
    assert tol(torch.float32, 1)[0] == pytest.approx(4 * 3 * 2.0 ** -24)
    assert tol(torch.float32, 10_000)[0] == pytest.approx(4 * (2 + 100) * 2.0 ** -24)
    assert tol(torch.float32) == tol(torch.float32, DEFAULT_K) and tol(torch.float32)[0] < 1e-5
    assert tol(torch.float32, tf32=True)[0] == pytest.approx(4 * (2.0 ** -11 + (32 + 1) * 2.0 ** -24))
    assert tol(torch.float16)[0] == pytest.approx(4 * (2 * 2.0 ** -11 + 32 * 2.0 ** -24))
    assert tol(torch.bfloat16)[0] == pytest.approx(4 * (2 * 2.0 ** -8 + 32 * 2.0 ** -24))
    assert tol(torch.float32, 64) < tol(torch.float32, 4096) < tol(torch.float16, 64) < tol(torch.bfloat16, 64)
    before = torch.get_float32_matmul_precision()
    try:
        for precision, on_cuda in (("highest", "fp32"), ("high", "tf32"), ("medium", "fp32-bf16")):
            torch.set_float32_matmul_precision(precision)
            assert row(torch.float32, torch.device("cuda")) == on_cuda, precision
            assert row(torch.float32, torch.device("cpu")) == "fp32"  # CPU and interpreter: exact fp32 products
    finally:
        torch.set_float32_matmul_precision(before)
    assert row(torch.float16, "cuda") == "fp16" and row(torch.float32, "cpu", tf32=True) == "tf32"
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="k: expected"):
            tol(torch.float32, bad)
    with pytest.raises(ValueError, match="dtype"):
        tol(torch.float64)


def test_error_ratio():
    e = torch.randn(5, 7, dtype=torch.float64)
    assert error_ratio(e.float(), e, torch.float32) < 1.0
    assert error_ratio(e * (1 + 1e-4), e, torch.float32) > 1.0 and error_ratio(e * (1 + 1e-4), e, torch.float16) < 1.0
    assert error_ratio(e * 1.01, e, torch.float16) > 1.0 and error_ratio(e * 1.01, e, torch.bfloat16) < 1.0
    assert error_ratio(e * (1 + 1e-4), e, torch.float32, tf32=True) < 1.0
    assert error_ratio(e[:4], e, torch.float32) == math.inf
    assert error_ratio(torch.full_like(e, math.nan), e, torch.float32) == math.inf


def test_op_modules_state_only_what_differs():
    """opspec's defaults fill what an op module leaves out; a module's own definition wins."""
    import fastpeft.bench.adapter as ad
    import fastpeft.bench.galore as gl

    for mod in (ad, lb, gl):
        assert not hasattr(mod, "impl_names")
    adapter, lora, galore = get_op("adapter"), get_op("lora"), get_op("galore")
    assert adapter.FLOOR is None and adapter.METRICS == ("fwd", "bwd", "fwd_bwd", "infer")
    assert not hasattr(ad, "main_metric") and adapter.main_metric(_smoke_case(adapter)) == "fwd_bwd"
    assert lora.needs_twin(lb.cases("smoke")[0]) and not adapter.needs_twin(_smoke_case(adapter))
    assert lora.impl_names(lb.cases("smoke")[0], ("torch", "cuda"))[-2:] == ["fastpeft[torch]", "fastpeft[cuda]"]
    assert adapter.impl_names(_smoke_case(adapter), ("torch", "cuda")) == ["eager", "compiled", "fastpeft[torch]"]
    assert galore.impl_names(_smoke_case(galore, "refresh")) == ["svd", "fastpeft[randomized]"]
    assert galore.main_metric(_smoke_case(galore, "step")) == "step" and "refresh" in galore.METRICS
    assert lora.accumulation(lb.Case(7, 40, 24, 3)) == 40
    with pytest.raises(ValueError, match="impl: expected one of"):
        adapter.build("nope", adapter.make_inputs(_smoke_case(adapter), CPU), common.BuildOptions())


def test_memory_bound_flags_small_m_only():
    assert core.memory_bound(lb, lb.Case(1, 4096, 4096, 16)) and core.memory_bound(lb, lb.Case(16, 4096, 4096, 16))
    assert not core.memory_bound(lb, lb.Case(8192, 4096, 4096, 16))


class _Saver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        t = x * 2  # a new storage, saved three times (once as a view)
        buf = x.new_zeros(50)  # a 200-byte storage of which a 5-element slice is saved
        ctx.save_for_backward(x, x[1:], w, t, t[:, :3], t, buf[:5])
        return t + w

    @staticmethod
    def backward(ctx, g):
        return 2 * g, g


def test_saved_tensor_counter_on_a_toy_graph():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    with SavedTensors(inputs=[x, w]) as saved:
        y = _Saver.apply(x, w).exp()  # exp saves its result: another new storage
    y.sum().backward()
    nb = 4 * 6 * 4
    assert sorted(e["bytes"] for e in saved.entries) == sorted([nb, nb, nb, 200, nb])  # x, w, t, buf, exp(...)
    assert saved.beyond_inputs_bytes == 2 * nb + 200
    expected = torch.exp(2 * x.detach() + w.detach())
    torch.testing.assert_close(x.grad, 2 * expected)  # the hooks change nothing
    fp = measure(lambda: torch.nn.functional.dropout(x, 0.5, True), CPU, [x])
    assert fp.saved.beyond_inputs_bytes >= 4 * 6 and fp.peak_bytes is None  # the mask; no allocator stats on CPU


def test_time_fn_runs_setup_before_every_timed_call():
    calls = {"setup": 0, "fn": 0}
    t = timing.time_fn(lambda: calls.__setitem__("fn", calls["fn"] + 1), CPU,
                       setup=lambda: calls.__setitem__("setup", calls["setup"] + 1),
                       warmup_ms=0, rep_ms=1e9, min_reps=4, max_reps=7)
    assert t.reps == 7 and calls["fn"] == calls["setup"] >= 7 + 4
    assert 0 < t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms
    with pytest.raises(ValueError, match="min_reps"):
        timing.time_fn(lambda: None, CPU, min_reps=3, max_reps=2)


def test_report_handles_a_case_where_everything_skipped():
    case = lb.Case(3, 8, 8, 2, "fp32")
    res = [core.result(case, n, "skip", "why") for n in ("floor", "fastpeft[torch]")]
    text = report.format_case(case.label, {r["impl"]: r for r in res}, "floor")
    assert "skip" in text and "why" in text
    assert common.main_impl(CPU) == "fastpeft[torch]"


def test_auto_is_its_own_impl_only_where_the_op_measures(monkeypatch):
    from fastpeft.bench import get_op, opspec

    lora, ia3, adapter = get_op("lora"), get_op("ia3"), get_op("adapter")
    case = lb.Case(3, 8, 8, 2, "fp32")
    assert "fastpeft[auto]" in lora.impl_names(case) and "fastpeft[cuda]" in lora.impl_names(case)
    assert "fastpeft[auto]" in ia3.impl_names(ia3.headline("quick"))
    assert not any(n == "fastpeft[auto]" for n in adapter.impl_names(adapter.headline("quick")))
    assert opspec.expand(("fastpeft",), ("auto",)) == []
    # on the CPU auto is the torch backend: skipped with that reason, and the headline impl stays fastpeft[torch]
    with pytest.raises(common.Unavailable, match="torch backend on the CPU"):
        common.fastpeft_backend("fastpeft[auto]", CPU, has_auto=True)
    assert common.main_impl(CPU, lora) == "fastpeft[torch]"
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "0")
    reasons = common.backend_reasons(torch.device("cuda"), has_auto=True, has_cuda_kernels=True)
    assert "FASTPEFT_AUTOTUNE=0" in reasons["auto"]
