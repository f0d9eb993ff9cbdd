"""Measured backend="auto" (fastpeft/autotune.py, ops/lora_linear_auto.py), tested on the CPU with injected
timings: the fastest candidate wins; decisions live in memory and on disk and come back in a new process; a
corrupt or stale file is ignored with one warning; FASTPEFT_AUTOTUNE=0, a spent time cap, torch.compile tracing
and CUDA graph capture take the cache or the static default without timing anything; backend_report lists the
decisions with their timings. The LoRA dispatcher runs real backends (CPU, Triton interpreter) through it."""
import json
import os
import warnings

import pytest
import torch

import fastpeft
from fastpeft import autotune
from fastpeft import _backend
from fastpeft.ops import lora_linear_auto as auto
from reference_lora import reference_with_grads
from tolerances import assert_close

CPU = torch.device("cpu")


class FakeTimer:
    """timer(fn) -> the injected milliseconds of fn.backend; counts calls; optionally runs fn once."""

    def __init__(self, times, run=False):
        self.times, self.run, self.calls = dict(times), run, []

    def __call__(self, fn):
        self.calls.append(fn.backend)
        if self.run:
            fn()
        return self.times[fn.backend]


class Run:
    def __init__(self, backend):
        self.backend = backend

    def __call__(self):
        return None


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """A fresh process state, the decisions file in tmp_path, measuring on, no cap."""
    path = tmp_path / "decisions.json"
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    monkeypatch.delenv(autotune.ENV_ENABLE, raising=False)
    monkeypatch.delenv(autotune.ENV_CAP, raising=False)
    autotune.reset()
    yield path
    autotune.set_timer(None)
    autotune.reset()


def _choose(key=("fp16", "m128"), cands=("torch", "triton", "cublas"), static="triton"):
    return autotune.choose("op", key, CPU, lambda: list(cands), Run, lambda: static)


def test_picks_the_fastest_and_caches_in_memory_and_on_disk(tuned):
    timer = FakeTimer({"torch": 3.0, "triton": 2.0, "cublas": 1.5})
    autotune.set_timer(timer)
    assert _choose() == "cublas"
    assert sorted(timer.calls) == ["cublas", "torch", "triton"]
    assert _choose() == "cublas" and len(timer.calls) == 3  # memory: not measured again
    assert autotune.lookup("op", ("fp16", "m128"), CPU) == "cublas"
    data = json.loads(tuned.read_text())
    assert data["device"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert data["decisions"]["op|fp16|m128"] == {"backend": "cublas", "times_ms": {"torch": 3.0, "triton": 2.0, "cublas": 1.5}}
    assert [f for f in os.listdir(tuned.parent) if f != tuned.name] == []  # the atomic write left no temporary file
    # another key measures again; the file keeps both
    timer.times["triton"] = 0.5
    assert _choose(key=("fp16", "m256")) == "triton"
    assert set(json.loads(tuned.read_text())["decisions"]) == {"op|fp16|m128", "op|fp16|m256"}


def test_a_new_process_reloads_the_decisions_from_disk(tuned):
    autotune.set_timer(FakeTimer({"torch": 3.0, "triton": 1.0, "cublas": 2.0}))
    assert _choose() == "triton"
    autotune.reset()  # a new process
    timer = FakeTimer({"torch": 0.1, "triton": 9.0, "cublas": 9.0})
    autotune.set_timer(timer)
    assert _choose() == "triton" and timer.calls == []
    (rec,) = autotune.report()["decisions"]
    assert rec["source"] == "disk" and rec["backend"] == "triton" and rec["times_ms"]["triton"] == 1.0


def test_a_disk_decision_for_a_backend_that_cannot_run_now_is_measured_again(tuned):
    autotune.set_timer(FakeTimer({"torch": 3.0, "triton": 1.0, "cublas": 2.0}))
    assert _choose() == "triton"
    autotune.reset()
    timer = FakeTimer({"torch": 3.0, "cublas": 2.0})
    autotune.set_timer(timer)
    assert _choose(cands=("torch", "cublas")) == "cublas" and len(timer.calls) == 2


def test_corrupt_file_one_warning_and_measured_again(tuned):
    tuned.write_text("{not json")
    timer = FakeTimer({"torch": 3.0, "triton": 1.0, "cublas": 2.0})
    autotune.set_timer(timer)
    with pytest.warns(RuntimeWarning, match="does not parse") as rec:
        assert _choose() == "triton"
        assert _choose(key=("fp16", "m512")) == "triton"
    assert len([w for w in rec if "autotune" in str(w.message)]) == 1
    assert len(timer.calls) == 6
    assert json.loads(tuned.read_text())["decisions"]["op|fp16|m128"]["backend"] == "triton"  # rewritten, valid


@pytest.mark.parametrize("field", ["device", "versions", "format"])
def test_stale_file_is_ignored_with_one_warning(tuned, field):
    autotune.set_timer(FakeTimer({"torch": 3.0, "triton": 1.0, "cublas": 2.0}))
    assert _choose() == "triton"
    data = json.loads(tuned.read_text())
    data[field] = {"device": "NVIDIA H100", "versions": {"fastpeft": "0.0.1", "torch": "1.0", "triton": "2.0"},
                   "format": 999}[field]
    tuned.write_text(json.dumps(data))
    autotune.reset()
    timer = FakeTimer({"torch": 3.0, "triton": 4.0, "cublas": 2.0})
    autotune.set_timer(timer)
    with pytest.warns(RuntimeWarning, match="ignoring the decisions file"):
        assert _choose() == "cublas"
    assert len(timer.calls) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert _choose(key=("x",)) == "cublas"


def test_autotune_off_takes_the_static_default_without_timing(tuned, monkeypatch):
    monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    timer = FakeTimer({"torch": 1.0, "triton": 2.0, "cublas": 3.0})
    autotune.set_timer(timer)
    assert _choose(static="triton") == "triton" and timer.calls == []
    assert not tuned.exists()
    assert autotune.report()["enabled"] is False and autotune.report()["decisions"][0]["source"] == "static"
    # resolve_backend itself then never answers "measured" on a CUDA device
    monkeypatch.setattr(_backend, "device_class", lambda d: "sm_90")
    monkeypatch.setattr(_backend, "triton_unavailable_reason", lambda d: None)
    assert _backend.resolve_backend("auto", torch.device("cuda"), measured=True, cublas_ok=None) == "triton"
    monkeypatch.setenv(autotune.ENV_ENABLE, "1")
    assert _backend.resolve_backend("auto", torch.device("cuda"), measured=True, cublas_ok=None) == _backend.MEASURED
    assert _backend.resolve_backend("auto", torch.device("cuda"), cublas_ok=None) == "triton"  # an op that does not measure
    assert _backend.resolve_backend("auto", CPU, measured=True, cublas_ok=None) == "torch"  # CPU: never measured


def test_cap_spent_takes_the_static_default(tuned, monkeypatch):
    timer = FakeTimer({"torch": 1.0, "triton": 2.0, "cublas": 3.0})
    autotune.set_timer(timer)
    monkeypatch.setenv(autotune.ENV_CAP, "0")
    assert _choose(static="cublas") == "cublas" and timer.calls == []
    assert "cap" in autotune.report()["decisions"][0]["source"]
    monkeypatch.setenv(autotune.ENV_CAP, "1000")
    autotune.reset()
    autotune._STATE.spent = 1000.0  # a process that spent its budget already
    assert _choose(key=("other",), static="triton") == "triton" and timer.calls == []


@pytest.mark.parametrize("why", ["compiling", "capturing"])
def test_no_measuring_while_compiling_or_capturing(tuned, monkeypatch, why):
    timer = FakeTimer({"torch": 3.0, "triton": 2.0, "cublas": 1.0})
    autotune.set_timer(timer)
    assert _choose(key=("cached",)) == "cublas"  # measured before, eagerly
    calls = len(timer.calls)
    if why == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert autotune.measuring_blocked() is not None
    assert _choose(key=("cached",)) == "cublas"  # the cache decides
    assert _choose(key=("new",), static="triton") == "triton"  # the static default decides
    assert len(timer.calls) == calls
    autotune.reset()  # a new process inside capture: the disk decides, nothing is timed
    assert _choose(key=("cached",)) == "cublas" and len(timer.calls) == calls
    monkeypatch.undo()
    monkeypatch.setenv(autotune.ENV_CACHE, str(tuned))
    assert _choose(key=("new",)) == "cublas" and len(timer.calls) == calls + 3  # eager again: measured


def test_a_failing_candidate_is_passed_over(tuned):
    def timer(fn):
        if fn.backend == "cublas":
            raise RuntimeError("CUDA out of memory")
        return {"torch": 2.0, "triton": 1.0}[fn.backend]

    autotune.set_timer(timer)
    assert _choose() == "triton"
    (rec,) = autotune.report()["decisions"]
    assert "out of memory" in rec["errors"]["cublas"]


def test_backend_report_lists_decisions_with_timings(tuned):
    autotune.set_timer(FakeTimer({"torch": 3.0, "triton": 2.0, "cublas": 1.5}))
    _choose()
    rep = fastpeft.backend_report("cpu")
    assert rep["available"]["cublas"]  # the interpreter (tests/conftest.py)
    at = rep["autotune"]
    assert at["enabled"] and at["cap_s"] == autotune.DEFAULT_CAP_S
    (d,) = at["decisions"]
    assert d["op"] == "op" and d["backend"] == "cublas" and d["source"] == "measured"
    assert d["times_ms"] == {"torch": 3.0, "triton": 2.0, "cublas": 1.5} and d["key"] == "fp16|m128"


def test_default_cache_path_names_device_and_versions(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.ENV_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = autotune.cache_path(CPU)
    assert p.startswith(str(tmp_path / "fastpeft" / "autotune-cpu-"))
    assert fastpeft.__version__ in p and torch.__version__.split("+")[0] in p and p.endswith(".json")


def test_buckets():
    assert [autotune.m_bucket(m) for m in (1, 2, 3, 100, 128, 129)] == [1, 2, 4, 128, 128, 256]
    assert [autotune.r_bucket(r) for r in (1, 8, 16, 17, 64)] == [16, 16, 16, 32, 64]


# ----------------------------------------------------------------------------------- the LoRA dispatcher


def _lora(m=37, k=45, n=53, r=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(m, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype),
            (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype), (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype),
            torch.randn(n, generator=g).to(dtype))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_dispatcher_measures_each_pass_and_runs_the_winner(tuned, monkeypatch, p):
    monkeypatch.setattr(auto, "lora_candidates", lambda device, r: ["torch", "triton", "cublas"])
    timer = FakeTimer({"torch": 3.0, "triton": 2.0, "cublas": 1.0}, run=True)  # runs each candidate once
    autotune.set_timer(timer)
    x, w, a, b, bs = _lora()
    before = [t.clone() for t in (x, w, a, b, bs)]
    rng = torch.get_rng_state()
    xr, ar, br, bsr = (t.clone().requires_grad_() for t in (x, a, b, bs))
    y = fastpeft.LoRALinearFunction.apply(xr, w, ar, br, bsr, 1.75, p, 1234, "measured")
    dy = torch.randn(37, 53, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    assert torch.equal(torch.get_rng_state(), rng)  # measuring drew nothing from torch's generator
    assert all(torch.equal(t, u) for t, u in zip((x, w, a, b, bs), before))
    y_ref, g_ref = reference_with_grads(x, w, a, b, bs, 1.75, dy, p, 1234)
    assert_close(y, y_ref, torch.float32, "y")
    for name, t, ref in (("dx", xr, g_ref[0]), ("dA", ar, g_ref[2]), ("dB", br, g_ref[3]), ("dbias", bsr, g_ref[4])):
        assert_close(t.grad, ref, torch.float32, name)
    recs = autotune.report()["decisions"]
    assert [r["key"].split("|")[-1] for r in recs] == ["fwd", "bwd:dx+dA+dB+dbias"]
    assert all(r["backend"] == "cublas" and r["source"] == "measured" for r in recs)
    assert (("dropout" if p > 0 else "nodropout") in recs[0]["key"]) and "m64" in recs[0]["key"]
    assert len(timer.calls) == 6
    # same bucket (M=40 -> 64), no new measurement; the forward decision is also what measured_choice reports
    x2 = torch.randn(40, 45)
    fastpeft.LoRALinearFunction.apply(x2, w, a, b, bs, 1.75, p, 1234, "measured")
    assert len(timer.calls) == 6
    assert auto.measured_choice(x2, w, a, bs, p) == "cublas"


def test_lora_hot_path_dispatches_by_shape(tuned, monkeypatch):
    """The cached hot path resolves once per layer signature; with "measured" it still picks per shape bucket."""
    from fastpeft.ops import lora_linear_cached as cached

    monkeypatch.setattr(auto, "lora_candidates", lambda device, r: ["torch", "cublas"])
    monkeypatch.setattr(cached, "resolve_lora_backend", lambda backend, device, r: "measured")

    def timer(fn):  # small M: torch wins; large M: cublas wins
        fn()
        return ({"torch": 1.0, "cublas": 2.0} if _m[0] <= 8 else {"torch": 2.0, "cublas": 1.0})[fn.backend]

    _m = [0]
    autotune.set_timer(timer)
    cache = cached.LoRACallCache()
    x, w, a, b, bs = _lora()
    with torch.no_grad():
        for m in (4, 100):
            _m[0] = m
            y = cached.lora_linear_cached(cache, torch.randn(m, 45), w, a, b, 1.5, bias=bs)
            assert y.shape == (m, 53)
    assert cache.backend == "measured"
    assert [r["backend"] for r in autotune.report()["decisions"]] == ["torch", "cublas"]


def test_lora_tensor_seed_never_goes_to_the_cuda_backend(monkeypatch):
    monkeypatch.setattr(auto, "_static", lambda device, r: "triton")
    assert auto._guard("cuda", CPU, 4, 0.1, torch.tensor(3)) == "triton"
    assert auto._guard("cuda", CPU, 4, 0.1, 3) == "cuda"
    assert auto._guard("cuda", CPU, 4, 0.0, torch.tensor(3)) == "cuda"


# ----------------------------------------------------------------------------------- the LoRA GEMM's config


def _gemm_args(m=37, k=56, n=72, r=5, dtype=torch.float32, q_kn=False):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(m, k, generator=g).to(dtype)
    q = torch.randn(k, n, generator=g).to(dtype)
    q_t = q.t() if q_kn else q.t().contiguous()
    return p, q_t, torch.randn(m, r, generator=g).to(dtype), torch.randn(n, r, generator=g).to(dtype), \
        torch.randn(n, generator=g).to(dtype)


@pytest.fixture
def gemm_tuned(tuned, monkeypatch):
    """The GEMM's config measured on CPU tensors: `tunable` forced on, two interpreter-sized candidates (the
    persistent one among them) for every bucket."""
    from fastpeft.kernels import lora_gemm_tuning as gt
    from fastpeft.kernels import lora_linear_configs as kc

    cands = {"default": kc.INTERPRETER_CONFIGS["gemm"], "persistent": kc.INTERPRETER_CONFIGS["gemm_persistent"]}
    monkeypatch.setattr(gt, "tunable", lambda device: True)
    monkeypatch.setattr(gt, "gemm_candidates", lambda M, dtype, path, dropout: cands)
    return tuned


@pytest.mark.parametrize("dropout", [False, True])
def test_gemm_config_fastest_is_chosen_cached_and_run(gemm_tuned, dropout):
    from fastpeft.kernels import lora_linear as k
    from fastpeft.kernels.lora_gemm_tuning import chosen_gemm_configs

    timer = FakeTimer({"default": 2.0, "persistent": 1.0}, run=True)  # each candidate runs once on fresh tensors
    autotune.set_timer(timer)
    p, q_t, lo, rm_t, bias = _gemm_args(q_kn=dropout)
    before = [t.clone() for t in (p, q_t, lo, rm_t, bias)]
    rng = torch.get_rng_state()
    drop = (torch.tensor(77), 2 ** 31) if dropout else None  # a tensor seed: the runners take their own int
    y = k.lora_gemm(p, q_t, lo, rm_t, bias, 0.5, drop)
    assert sorted(timer.calls) == ["default", "persistent"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(t, u) for t, u in zip((p, q_t, lo, rm_t, bias), before))
    ref = k.lora_gemm(p, q_t, lo, rm_t, bias, 0.5, drop, tuned=("tma", k.INTERPRETER_CONFIGS["gemm"]))
    assert torch.equal(y, ref)
    # same bucket (M = 40 -> 64): one dict lookup, nothing timed again
    k.lora_gemm(torch.randn(40, 56), q_t, torch.randn(40, 5), rm_t, bias, 0.5, drop)
    assert len(timer.calls) == 2
    (rec,) = [r for r in autotune.report()["decisions"] if r["op"] == "lora_gemm"]
    assert rec["backend"] == "persistent" and rec["source"] == "measured" and rec["times_ms"]["default"] == 2.0
    assert rec["key"] == f"torch.float32|tma|m64|n72|k56|{'dropout' if dropout else 'nodropout'}|" \
                         f"{'q_kn' if dropout else 'q_nk'}"
    (chosen,) = chosen_gemm_configs()
    assert chosen["backend"] == "persistent" and chosen["detail"]["PERSISTENT"] is True
    assert json.loads(gemm_tuned.read_text())["decisions"][f"lora_gemm|{rec['key']}"]["backend"] == "persistent"
    assert fastpeft.backend_report("cpu")["autotune"]["decisions"][0]["op"] == "lora_gemm"
    autotune.reset()  # a new process: the file decides
    assert k.lora_gemm(p, q_t, lo, rm_t, bias, 0.5, drop).shape == (37, 72) and len(timer.calls) == 2
    assert autotune.report()["decisions"][0]["source"] == "disk"


@pytest.mark.parametrize("why", ["off", "compiling", "capturing"])
def test_gemm_config_static_default_without_measuring(gemm_tuned, monkeypatch, why):
    from fastpeft.kernels import lora_gemm_tuning as gt

    timer = FakeTimer({"default": 2.0, "persistent": 1.0})
    autotune.set_timer(timer)
    if why == "off":
        monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    elif why == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    p, q_t, lo, rm_t, bias = _gemm_args()
    cfg = gt.tuned_gemm_config(None, p, q_t, lo, rm_t, bias, 1.0, None, "tma", False)  # `launch` never called
    assert cfg is gt.gemm_candidates(37, p.dtype, "tma", False)["default"] and timer.calls == []
    assert not gemm_tuned.exists()
    recs = autotune.report()["decisions"]
    assert (recs[0]["source"] == "static") if why == "off" else recs == []  # capture / tracing: not remembered


def test_gemm_config_untuned_on_cpu_and_under_the_interpreter(tuned):
    """Without the override: CPU tensors take the interpreter config, nothing is recorded."""
    from fastpeft.kernels import lora_gemm_tuning as gt
    from fastpeft.kernels import lora_linear_configs as kc

    p, q_t, lo, rm_t, bias = _gemm_args()
    assert not gt.tunable(p.device)
    assert gt.tuned_gemm_config(None, p, q_t, lo, rm_t, bias, 1.0, None, "tma", False) == kc.INTERPRETER_CONFIGS["gemm"]
    assert autotune.report()["decisions"] == []


def test_gemm_candidate_sets(monkeypatch):
    """Per path and M bucket 1-4 candidates, "default" being the static table's entry (what FASTPEFT_AUTOTUNE=0
    runs); persistent ones on the "tma" path only; fp32 keeps the default alone (the static test compiles the
    others for 16-bit operands only); every bucket the launcher can pick has a set."""
    from fastpeft.kernels import lora_linear_configs as kc

    monkeypatch.setattr(kc, "interpreting", lambda: False)
    for path, sets in kc.GEMM_CANDIDATES.items():
        assert set(sets) == set(kc.GEMM_CONFIGS[path])
        for size, cands in sets.items():
            assert 1 <= len(cands) <= 4 and cands[kc.DEFAULT_CANDIDATE] is kc.GEMM_CONFIGS[path][size]
            assert path == "tma" or not any(c.get("PERSISTENT") for c in cands.values())
    assert any(c.get("PERSISTENT") for c in kc.GEMM_CANDIDATES["tma"]["large"].values())
    for M, dropout in ((1, False), (100, True), (1000, False), (1000, True)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            got = kc.gemm_candidates(M, dtype, "tma", dropout)
            assert got[kc.DEFAULT_CANDIDATE] == kc.gemm_config(M, dtype, "tma", dropout)
            assert len(got) == 1 if dtype == torch.float32 else len(got) >= 2
