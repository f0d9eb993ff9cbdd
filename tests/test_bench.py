"""The benchmark harness: the CLI end to end on a tiny CPU case, the saved-activation counter, the check,
the ratios and the presets. No timing figure is asserted here (performance claims come from benchmarks)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from fastpeft.bench import harness, report
from fastpeft.bench import lora_cases as lc
from fastpeft.bench.__main__ import main as bench_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--m", "3", "--shape", "24x40", "--r", "4", "--dropout", "0", "0.1"]
FAST = ["--rep-ms", "1", "--min-reps", "2", "--max-reps", "3", "--warmup-ms", "0"]


def _strict_json(path):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=bad)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One run of `python -m fastpeft.bench --preset cpu` on a tiny case (peft left out: its import alone
    takes ~10 s here; test_peft_layer covers it)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "fastpeft.bench", "--preset", "cpu", "--device", "cpu", *TINY, *FAST,
           "--impl", "floor", "eager", "addmm", "fastpeft", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    jsons = [f for f in files if f.endswith(".json")]
    assert len(jsons) == 1, files
    return out, jsons[0], _strict_json(out / jsons[0]), proc.stdout


def test_cli_writes_valid_json_with_metadata(cli_run):
    out, name, doc, stdout = cli_run
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_cpu\.json", name), name
    assert "CPU figures" in stdout
    assert doc["schema"] == report.SCHEMA
    meta = doc["meta"]
    for key in ("date", "command", "device_type", "device_name", "torch", "triton", "cuda", "peft", "git_commit"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and meta["device_name"]
    assert meta["torch"] == torch.__version__ and meta["cuda"] is None
    assert "fastpeft.bench" in meta["command"] and "--preset cpu" in meta["command"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", meta["date"])
    assert meta["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert os.path.getsize(out / name.replace(".json", ".png")) > 1000


def test_cli_results_are_checked_timed_and_measured(cli_run):
    _, _, doc, _ = cli_run
    by = {(r["impl"], r["case"]["dropout"]): r for r in doc["results"]}
    m, k, r_ = 3, 24, 4
    for name in ("floor", "eager", "addmm", "fastpeft[torch]"):
        for p in (0.0, 0.1):
            res = by[(name, p)]
            assert res["status"] == "ok", (name, p, res["reason"])
            assert res["check"]["ok"] and res["check"]["worst"] <= 1.0
            assert set(res["times_ms"]) == set(lc.METRICS)
            assert all(math.isfinite(t) and t > 0 for t in res["times_ms"].values())
    assert by[("fastpeft[triton]", 0.0)]["status"] == "skip" and by[("fastpeft[triton]", 0.0)]["reason"]
    # the floor saves nothing of its own; eager PEFT saves its dropout mask and dropout(x) at p > 0
    assert by[("floor", 0.1)]["saved_beyond_inputs_bytes"] == 0
    assert by[("eager", 0.0)]["saved_beyond_inputs_bytes"] == m * r_ * 4  # x·Aᵀ, fp32
    assert by[("eager", 0.1)]["saved_beyond_inputs_bytes"] >= 2 * m * k + m * r_ * 4
    # the issue's target for fastpeft: nothing [M, in]-sized beyond x itself
    big = [t for t in by[("fastpeft[torch]", 0.1)]["saved_beyond_inputs"] if math.prod(t["shape"]) >= m * k]
    assert big == [], big
    ratio = {(e["impl"], e["case"]): e for e in doc["ratios"]}
    res, floor = by[("fastpeft[torch]", 0.1)], by[("floor", 0.1)]
    e = ratio[("fastpeft[torch]", res["case"]["label"])]
    assert e["vs_floor"]["fwd_bwd"] == pytest.approx(res["times_ms"]["fwd_bwd"] / floor["times_ms"]["fwd_bwd"])
    assert e["speedup"]["eager"]["fwd"] == pytest.approx(by[("eager", 0.1)]["times_ms"]["fwd"] / res["times_ms"]["fwd"])


def test_summarize_prints_markdown(cli_run, capsys):
    out, name, _, _ = cli_run
    assert bench_main(["--summarize", str(out / name), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| impl | check |" in text and "fastpeft[torch]" in text and "CPU figures" in text


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--shape", "4096"], ["--dropout", "1.0"], ["--m", "0"], ["--preset", "huge"]):
        with pytest.raises(SystemExit) as exc:
            bench_main(argv + ["--list"])
        assert exc.value.code == 2, argv
    with pytest.raises(SystemExit, match="--impl"):
        bench_main(["--impl", "lora2", "--list"])


class _Saver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        t = x * 2  # a new storage, saved three times (once as a view)
        buf = x.new_zeros(50)  # a 200-byte storage of which a 5-element slice is saved
        ctx.save_for_backward(x, x[1:], w, t, t[:, :3], t, buf[:5])
        return t + w

    @staticmethod
    def backward(ctx, g):
        x, xv, w, t, tv, t2, b = ctx.saved_tensors
        return 2 * g, g


def test_saved_tensor_counter_on_a_toy_graph():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(4, 6, requires_grad=True)
    with harness.SavedTensors(inputs=[x, w]) as saved:
        y = _Saver.apply(x, w).exp()  # exp saves its result: another new storage
    y.sum().backward()
    nb = 4 * 6 * 4
    assert sorted(e["bytes"] for e in saved.entries) == sorted([nb, nb, nb, 200, nb])  # x, w, t, buf, exp(...)
    assert saved.total_bytes == 4 * nb + 200
    assert saved.beyond_inputs_bytes == 2 * nb + 200
    assert sorted(e["input"] for e in saved.entries) == [False, False, False, True, True]
    expected = torch.exp(2 * x.detach() + w.detach())
    torch.testing.assert_close(x.grad, 2 * expected)  # the hooks change nothing
    torch.testing.assert_close(w.grad, expected)


def test_saved_tensor_counter_sees_a_dropout_mask():
    x = torch.randn(8, 16, requires_grad=True)
    with harness.SavedTensors(inputs=[x]) as saved:
        torch.nn.functional.dropout(x, 0.5, True)
    assert saved.beyond_inputs_bytes >= 8 * 16  # the mask, at least a byte per element
    with harness.SavedTensors(inputs=[x]) as none:
        with torch.no_grad():
            torch.nn.functional.dropout(x, 0.5, True)
    assert none.entries == []


def _tiny_inputs(p=0.0, dtype="fp32"):
    case = lc.Case(5, 24, 40, 4, dtype, p)
    return lc.make_inputs(case, "cpu", seed=1)


FAST_SETTINGS = lc.Settings(warmup_ms=0, rep_ms=1, min_reps=2, max_reps=2, metrics=("fwd_bwd",))


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("name", ["eager", "addmm"])
def test_baselines_pass_the_check(name, p):
    inp = _tiny_inputs(p)
    res = lc.run_impl(name, inp, FAST_SETTINGS, {})
    assert res["status"] == "ok" and res["check"]["ok"], res
    assert res["times_ms"]["fwd_bwd"] > 0


def test_check_catches_a_wrong_implementation(monkeypatch):
    inp = _tiny_inputs(0.0)
    real = lc.build_eager

    def wrong_scaling(inp, p):
        impl = real(inp, p)
        impl.forward.scaling *= 1.5
        return impl

    monkeypatch.setattr(lc, "build_eager", wrong_scaling)
    res = lc.run_case(inp.case, ["floor", "eager"], torch.device("cpu"), FAST_SETTINGS)
    by = {r["impl"]: r for r in res}
    assert by["floor"]["status"] == "ok"
    assert by["eager"]["status"] == "fail" and "times_ms" not in by["eager"]  # a wrong implementation is not timed
    assert by["eager"]["check"]["worst"] > 1.0


def test_addmm_recipe_saves_x_and_xa_only():
    inp = _tiny_inputs(0.0)
    impl = lc.build("addmm", inp, 0.0)
    fp = harness.fwd_bwd_footprint(impl.forward, inp.x, inp.dy, inputs=impl.inputs, grads=impl.grads)
    assert [tuple(e["shape"]) for e in fp.saved.beyond_inputs] == [(5, 4)]
    assert any(tuple(e["shape"]) == (5, 24) and e["input"] for e in fp.saved.entries)


def test_peft_layer():
    pytest.importorskip("peft", reason="peft is not installed: the HF PEFT baseline is skipped")
    for p in (0.0, 0.1):
        inp = _tiny_inputs(p)
        res = lc.run_impl("peft", inp, FAST_SETTINGS, {})
        assert res["status"] == "ok" and res["check"]["ok"], res
        if p > 0:  # PEFT's dropout stores dropout(x) (and a mask): more than x·Aᵀ
            assert res["saved_beyond_inputs_bytes"] > 5 * 24 * 4


def test_time_fn_runs_setup_before_every_timed_call():
    calls = {"setup": 0, "fn": 0}
    t = harness.time_fn(lambda: calls.__setitem__("fn", calls["fn"] + 1), torch.device("cpu"),
                        setup=lambda: calls.__setitem__("setup", calls["setup"] + 1),
                        warmup_ms=0, rep_ms=1e9, min_reps=4, max_reps=7)
    assert t.reps == 7 and calls["fn"] == calls["setup"] >= 7 + 4
    assert 0 < t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms
    with pytest.raises(ValueError, match="min_reps"):
        harness.time_fn(lambda: None, torch.device("cpu"), min_reps=3, max_reps=2)


def test_presets_cover_the_issue_grid():
    full = lc.preset_cases("full")
    head = full[0]
    assert head.key == (8192, 4096, 4096, 16, "bf16", 0.1) and "headline" in head.tags
    assert full[1].key == (1, 4096, 4096, 16, "bf16", 0.0) and "decode" in full[1].tags
    assert len({c.key for c in full}) == len(full)
    assert {c.m for c in full} == set(lc.AXES["m"])
    assert {(c.in_features, c.out_features) for c in full} == set(lc.AXES["shape"])
    assert {c.r for c in full} == set(lc.AXES["r"]) and {c.dropout for c in full} == set(lc.AXES["dropout"])
    for c in full:  # one axis at a time around the headline (decode cases: M, width and p=0)
        if "decode" not in c.tags:
            diffs = [a != b for a, b in zip(c.key, head.key)]
            assert diffs[0] + any(diffs[1:3]) + sum(diffs[3:]) <= 1, c.label
    # the modelled part of the full grid leaves most of the 10-minute GPU session to compilation and tests
    n = len(lc.impl_names(torch.device("cuda")))
    st = lc.Settings(**lc.PRESETS["full"]["timing"])
    assert lc.estimate_seconds(full, n, st, torch.device("cuda")) < 150
    quick = lc.preset_cases("quick")
    assert quick[0].key == head.key and any("decode" in c.tags for c in quick)
    assert {c.dtype for c in lc.preset_cases("full", ["fp16", "fp32"])} == {"fp16", "fp32"}


def test_explicit_axes_form_a_cross_product():
    cases = lc.grid_cases("full", m=[1, 16], r=[8, 64], dtypes=["fp16"])
    assert sorted((c.m, c.r) for c in cases) == [(1, 8), (1, 64), (16, 8), (16, 64)]
    assert all((c.in_features, c.out_features, c.dropout, c.dtype) == (4096, 4096, 0.1, "fp16") for c in cases)


def test_memory_bound_flags_small_m_only():
    assert lc.memory_bound(lc.Case(1, 4096, 4096, 16)) and lc.memory_bound(lc.Case(16, 4096, 4096, 16))
    assert not lc.memory_bound(lc.Case(8192, 4096, 4096, 16))
