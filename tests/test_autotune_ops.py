"""Measured backend="auto" for IA3 (ops/ia3_auto.py) and multi-LoRA (ops/multi_lora_auto.py), with the shared
helper ops/measured.py, tested with injected timings and candidates (torch, triton and cublas under the Triton
interpreter on the CPU): the fastest is chosen per pass and is the launcher that runs; measuring touches neither
the caller's tensors nor torch's RNG; results equal the chosen backend's; the disk cache is reused by a new
process; FASTPEFT_AUTOTUNE=0 and torch.compile tracing take the static default without timing anything."""
import torch
import pytest

import fastpeft
from fastpeft import _backend, autotune
from fastpeft.ops import ia3 as ia3_ops
from fastpeft.ops import ia3_auto, multi_lora_auto
from fastpeft.ops import multi_lora as ml
from fastpeft.ops.ia3 import IA3LinearFunction
from fastpeft.ops.multi_lora import MultiLoRALinearFunction, build_table
from conftest import DEVICE
from test_autotune import FakeTimer, tuned  # noqa: F401,F811  (the fixture)

DEV = torch.device(DEVICE)
ALL = ["torch", "triton", "cublas"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _record_launchers(monkeypatch, module, attr):
    """Wrap module.attr (name -> launchers) so that each launcher records the backend it belongs to when it runs."""
    ran, real = [], getattr(module, attr)

    def wrapped(name):
        fwd, bwd = real(name)

        def f(*a, **k):
            ran.append(("fwd", name))
            return fwd(*a, **k)

        def b(*a, **k):
            ran.append(("bwd", name))
            return bwd(*a, **k)
        return f, b

    monkeypatch.setattr(module, attr, wrapped)
    return ran


def _pass_timer(fwd_times, bwd_times):
    """A timer whose milliseconds depend on the pass (the runner's function name) and the backend; runs fn once."""
    calls = []

    def timer(fn):
        fn()
        calls.append(fn.backend)
        return (bwd_times if "bwd" in getattr(fn.fn, "__qualname__", "") else fwd_times)[fn.backend]
    timer.calls = calls
    return timer


# ----------------------------------------------------------------------------------------------- IA3


def _ia3(m=23, k=19, n=13, mode="output"):
    g = _gen(0)
    x = torch.randn(m, k, generator=g).to(DEV)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEV)
    b = torch.randn(n, generator=g).to(DEV)
    l = (1 + torch.randn(n if mode == "output" else k, generator=g) / 4).to(DEV)
    return x, w, b, l


def _ia3_run(backend, x, w, b, l, mode, dy):
    xr, lr = x.clone().requires_grad_(), l.clone().requires_grad_()
    y = IA3LinearFunction.apply(xr, w, b, lr, mode, backend)
    y.backward(dy)
    return y.detach(), xr.grad, lr.grad


@pytest.mark.parametrize("mode", ["output", "input"])
def test_ia3_measures_each_pass_runs_the_winner_and_reuses_the_disk(tuned, monkeypatch, mode):
    monkeypatch.setattr(ia3_auto, "ia3_candidates", lambda device: list(ALL))
    ran = _record_launchers(monkeypatch, ia3_auto, "launchers")
    timer = FakeTimer({"torch": 3.0, "triton": 2.0, "cublas": 1.0}, run=True)
    autotune.set_timer(timer)
    x, w, b, l = _ia3(mode=mode)
    dy = torch.randn(23, 13, generator=_gen(1)).to(DEV)
    before, rng = [t.clone() for t in (x, w, b, l)], torch.get_rng_state()
    got = _ia3_run("measured", x, w, b, l, mode, dy)
    assert torch.equal(torch.get_rng_state(), rng)  # measuring drew nothing from torch's generator
    assert all(torch.equal(t, u) for t, u in zip((x, w, b, l), before))
    assert sorted(timer.calls) == sorted(ALL * 2)
    # the timed runs went through each backend; then the winner ran the caller's passes
    assert ran[3] == ("fwd", "cublas") and ran[-1] == ("bwd", "cublas") and len(ran) == 8
    want = _ia3_run("cublas", x, w, b, l, mode, dy)
    for name, g_, w_ in zip(("y", "dx", "dl"), got, want):
        assert torch.equal(g_, w_), (name, (g_ - w_).abs().max())
    recs = autotune.report()["decisions"]
    assert [r["key"].split("|")[-1] for r in recs] == ["fwd", "bwd:dx+dl"]
    assert all(r["op"] == "ia3_linear" and r["backend"] == "cublas" and r["source"] == "measured" for r in recs)
    assert f"|{mode}|bias|" in recs[0]["key"] and "|m32|n13|k19|" in recs[0]["key"]
    # same bucket: nothing timed again; a new process takes the file's decisions
    with torch.no_grad():
        IA3LinearFunction.apply(torch.randn(30, 19).to(DEV), w, b, l, mode, "measured")
    autotune.reset()
    assert ia3_auto.measured_choice(x, w, b, l, mode) == "cublas"
    assert ia3_auto.measured_choice(x, w, b, l, mode, needs=(True, True)) == "cublas"
    assert len(timer.calls) == 6 and autotune.report()["decisions"][0]["source"] == "disk"


def test_ia3_passes_are_chosen_separately(tuned, monkeypatch):
    """A torch forward followed by a triton backward: IA3 saves no state of its forward, so they combine."""
    monkeypatch.setattr(ia3_auto, "ia3_candidates", lambda device: list(ALL))
    ran = _record_launchers(monkeypatch, ia3_auto, "launchers")
    autotune.set_timer(_pass_timer({"torch": 1.0, "triton": 2.0, "cublas": 3.0},
                                   {"torch": 3.0, "triton": 1.0, "cublas": 2.0}))
    x, w, b, l = _ia3()
    dy = torch.randn(23, 13, generator=_gen(1)).to(DEV)
    y, dx, dl = _ia3_run("measured", x, w, b, l, "output", dy)
    assert ran[3] == ("fwd", "torch") and ran[-1] == ("bwd", "triton")  # each after its pass's 3 timed runs
    assert torch.equal(y, _ia3_run("torch", x, w, b, l, "output", dy)[0])
    _, dx_t, dl_t = _ia3_run("triton", x, w, b, l, "output", dy)
    assert torch.equal(dx, dx_t) and torch.equal(dl, dl_t)


# ----------------------------------------------------------------------------------------------- multi-LoRA


def _multi(m=21, k=18, n=14, ranks=(3, 0, 5)):
    g = _gen(2)
    r_total = sum(ranks)
    x = torch.randn(m, k, generator=g).to(DEV)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEV)
    a = (torch.randn(r_total, k, generator=g) / k ** 0.5).to(DEV)
    b = (torch.randn(n, r_total, generator=g) / 2).to(DEV)
    bias = torch.randn(n, generator=g).to(DEV)
    ids = torch.randint(-1, len(ranks), (m,), generator=g).to(DEV)
    table = build_table(a, [0.5, 1.0, 2.0], list(ranks), None, None, DEV)
    return x, w, a, b, bias, ids, table


def _multi_run(backend, x, w, a, b, bias, ids, table, dy):
    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
    y = MultiLoRALinearFunction.apply(xr, w, ar, br, bias, ids, table, False, backend)
    y.backward(dy)
    return y.detach(), xr.grad, ar.grad, br.grad


def test_multi_lora_measures_each_pass_and_mixes_backends(tuned, monkeypatch):
    """Forward torch, backward cublas: S is the same for every backend and the backward groups the tokens
    itself when the forward made no grouping."""
    monkeypatch.setattr(multi_lora_auto, "multi_lora_candidates", lambda device, r: list(ALL))
    ran = _record_launchers(monkeypatch, ml, "_impl")
    timer = _pass_timer({"torch": 1.0, "triton": 2.0, "cublas": 3.0}, {"torch": 3.0, "triton": 2.0, "cublas": 1.0})
    autotune.set_timer(timer)
    x, w, a, b, bias, ids, table = _multi()
    dy = torch.randn(21, 14, generator=_gen(3)).to(DEV)
    before, rng = [t.clone() for t in (x, w, a, b, bias, ids)], torch.get_rng_state()
    got = _multi_run("measured", x, w, a, b, bias, ids, table, dy)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(t, u) for t, u in zip((x, w, a, b, bias, ids), before))
    assert len(timer.calls) == 6
    calls = [c for c in ran if c[0] == "fwd"]
    assert calls[-1] == ("fwd", "torch") and [c for c in ran if c[0] == "bwd"][-1] == ("bwd", "cublas")
    y_t = _multi_run("torch", x, w, a, b, bias, ids, table, dy)
    y_c = _multi_run("cublas", x, w, a, b, bias, ids, table, dy)
    assert torch.equal(got[0], y_t[0])
    for name, g_, w_ in zip(("dx", "dA", "dB"), got[1:], y_c[1:]):
        torch.testing.assert_close(g_, w_, rtol=1e-6, atol=1e-6, msg=name)  # from torch's S, equal to cublas's
    recs = autotune.report()["decisions"]
    assert [(r["key"].split("|")[-1], r["backend"]) for r in recs] == [("fwd", "torch"), ("bwd:dx+dA+dB", "cublas")]
    assert "|m32|n14|k18|r16|bias|" in recs[0]["key"] and recs[0]["op"] == "multi_lora_linear"
    autotune.reset()  # a new process: the file decides, nothing is timed
    assert multi_lora_auto.measured_choice(x, w, a, b, table, bias) == "torch"
    assert multi_lora_auto.measured_choice(x, w, a, b, table, needs=(1, 1, 1)) == "cublas"
    assert len(timer.calls) == 6


def test_multi_lora_fresh_pool_is_valid_and_the_custom_ops_dispatch(tuned, monkeypatch):
    from fastpeft.ops import multi_lora_custom_op as cop

    table, ids = multi_lora_auto.fresh_pool(DEV, 5, 10)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3] and table.host_offsets == [0, 5, 10, 15]
    monkeypatch.setattr(multi_lora_auto, "multi_lora_candidates", lambda device, r: list(ALL))
    monkeypatch.setattr(cop, "resolve_multi_lora_backend", lambda backend, device, r: "measured")
    timer = FakeTimer({"torch": 2.0, "triton": 1.0, "cublas": 3.0}, run=True)
    autotune.set_timer(timer)
    x, w, a, b, bias, ids, table = _multi(m=9)
    dy = torch.randn(9, 14, generator=_gen(4)).to(DEV)
    y, s = torch.ops.fastpeft.multi_lora_linear_fwd(x, w, a, b, bias, ids, table.ranks, table.offsets,
                                                    table.scalings, table.max_rank, False, True, "")
    dx, da, db = torch.ops.fastpeft.multi_lora_linear_bwd(dy, x, w, a, b, s, ids, table.ranks, table.offsets,
                                                          table.scalings, table.max_rank, False, True, True, True, "")
    want = _multi_run("triton", x, w, a, b, bias, ids, table, dy)
    for name, g_, w_ in zip(("y", "dx", "dA", "dB"), (y, dx, da, db), want):
        assert torch.equal(g_, w_), (name, (g_ - w_).abs().max())
    assert [r["backend"] for r in autotune.report()["decisions"]] == ["triton", "triton"]


# ----------------------------------------------------------------------------------------------- static defaults


@pytest.mark.parametrize("why", ["off", "compiling"])
def test_static_default_without_measuring(tuned, monkeypatch, why):
    monkeypatch.setattr(ia3_auto, "ia3_candidates", lambda device: list(ALL))
    monkeypatch.setattr(multi_lora_auto, "multi_lora_candidates", lambda device, r: list(ALL))
    monkeypatch.setattr(ia3_auto, "_static", lambda device: "triton")
    monkeypatch.setattr(multi_lora_auto, "_static", lambda device, r: "triton")
    timer = FakeTimer({"torch": 1.0, "triton": 2.0, "cublas": 3.0})
    autotune.set_timer(timer)
    if why == "off":
        monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, w, b, l = _ia3()
    assert ia3_auto.measured_choice(x, w, b, l) == "triton"
    xm, wm, am, bm, biasm, _, table = _multi()
    assert multi_lora_auto.measured_choice(xm, wm, am, bm, table, biasm) == "triton"
    assert multi_lora_auto.measured_choice(xm, wm, am, bm, table, needs=(1, 0, 1)) == "triton"
    assert timer.calls == [] and not tuned.exists()
    recs = autotune.report()["decisions"]
    assert all(r["source"] == "static" for r in recs) if why == "off" else recs == []  # tracing: not remembered


def test_resolve_and_backend_report_on_a_cuda_device(tuned, monkeypatch):
    """auto on CUDA answers "measured" for IA3 and multi-LoRA (within the Triton rank limit), the static default
    with FASTPEFT_AUTOTUNE=0; backend_report lists them."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "device_class", lambda d: "sm_90")
    monkeypatch.setattr(_backend, "triton_unavailable_reason", lambda d: None)
    monkeypatch.setattr(_backend, "cublas_unavailable_reason", lambda d: None)
    assert ia3_ops.resolve_ia3_backend("auto", cuda) == "measured"
    assert ml.resolve_multi_lora_backend("auto", cuda, 16) == "measured"
    assert ml.resolve_multi_lora_backend("auto", cuda, 10 ** 6) == "torch"  # torch alone can run: nothing to time
    assert ia3_ops._impl("measured") == (ia3_auto.ia3_fwd_measured, ia3_auto.ia3_bwd_measured)
    monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    assert ia3_ops.resolve_ia3_backend("auto", cuda) == "triton"
    assert ml.resolve_multi_lora_backend(None, cuda, 16) == "triton"
    monkeypatch.undo()
    auto = fastpeft.backend_report("cpu")["auto"]
    assert auto == {"lora_linear": "torch", "ia3_linear": "torch", "multi_lora_linear": "torch"}
