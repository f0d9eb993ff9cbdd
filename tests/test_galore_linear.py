"""Gradient-free GaLore (fastpeft.galore.enable): the projected gradient straight from X and dY, parity with
GaLoreAdamW fed the full gradient, gradient accumulation, no [out, in] gradient, state_dict, bad input."""
import copy
import io

import pytest
import torch
from torch import nn

import fastpeft.galore as fg
from fastpeft.ops.galore_linear import galore_linear
from fastpeft.optim import GaLoreAdamW
from fastpeft.optim import projector as pj
from tolerances import assert_close

BACKENDS = ["torch", "triton"]
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
ON_CPU = not torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 33), nn.Tanh(), nn.Linear(33, 17, bias=False)).to(DEV, dtype)


def _no_weight_grad_hook(p):
    # autograd runs the weight's accumulate node (the weight is an input of the Function) with no gradient
    assert p.grad is None, "a gradient was accumulated into a gradient-free weight"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_function_against_float64(backend, dtype, side):
    if backend == "triton" and dtype == torch.bfloat16 and ON_CPU:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 kernels are tested on CUDA")
    gen = torch.Generator().manual_seed(1)
    out_f, in_f, rank = 19, 27, 5
    x = torch.randn(3, 7, in_f + 4, generator=gen)[..., 2:in_f + 2].to(DEV, dtype).requires_grad_()  # non-contiguous
    w = torch.randn(out_f, in_f, generator=gen).to(DEV, dtype).requires_grad_()
    b = torch.randn(out_f, generator=gen).to(DEV, dtype).requires_grad_()
    st = fg.GaLoreLinearState(w.shape, rank, 10, 1.0, side, "svd", "keep", 8, 2, backend)
    p, q = pj.svd_basis(torch.randn(out_f, in_f, generator=gen), rank, side, dtype=dtype)
    st.P, st.Q = (None if t is None else t.to(DEV) for t in (p, q))
    st.refresh_due = False  # a fixed basis: this test checks the projection, not the refresh
    y = galore_linear(x, w, b, st)
    dy = torch.randn(y.shape, generator=gen).to(DEV, dtype)
    y.backward(dy)
    xd, wd, bd, dyd = (t.detach().double().cpu() for t in (x, w, b, dy))
    assert_close(y, xd @ wd.t() + bd, dtype, "y")
    assert_close(x.grad, dyd @ wd, dtype, "dx")
    assert_close(b.grad, dyd.sum((0, 1)), dtype, "dbias")
    assert w.grad is None
    g = dyd.reshape(-1, out_f).t() @ xd.reshape(-1, in_f)
    exp = pj.project(g, None if p is None else p.double(), None if q is None else q.double())
    assert_close(st.R, exp, dtype, "R")


# every proj_type on the torch backend; the Triton backend shares the dispatch, so two sides suffice there
SVD_PARITY = [("torch", p) for p in PROJ_TYPES] + [("triton", "std"), ("triton", "full")]


@pytest.mark.parametrize("backend, proj_type", SVD_PARITY)
def test_svd_mode_matches_optimizer_on_full_gradient(backend, proj_type):
    base = _model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    fg.enable(a, ["0", "2"], rank=4, update_proj_gap=2, scale=0.5, proj_type=proj_type, projector="svd", backend=backend)
    hooks = [a[i].weight.register_post_accumulate_grad_hook(_no_weight_grad_hook) for i in (0, 2)]
    opt_a = GaLoreAdamW(a.parameters(), lr=0.01, weight_decay=0.1, backend=backend)
    opt_b = GaLoreAdamW([{"params": [b[0].bias]}, {"params": [b[0].weight, b[2].weight], "rank": 4, "update_proj_gap": 2,
                                                      "scale": 0.5, "proj_type": proj_type}], lr=0.01, weight_decay=0.1, backend=backend)
    gen = torch.Generator().manual_seed(2)
    for t in range(4):  # refreshes at steps 0 and 2, the second one while moments exist
        x, y = torch.randn(13, 20, generator=gen).to(DEV), torch.randn(13, 17, generator=gen).to(DEV)
        for model, opt in ((a, opt_a), (b, opt_b)):
            ((model(x) - y) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
        assert a[0].weight.grad is None and a[2].weight.grad is None
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert_close(pa, pb.detach().double(), torch.float32, f"{name} after step {t}")
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_over_micro_batches_equals_one_batch(backend):
    # svd projector: exact, refresh steps included (G is accumulated on those)
    base = _model(3)
    one, four = copy.deepcopy(base), copy.deepcopy(base)
    for m in (one, four):
        fg.enable(m, ["0", "2"], rank=3, update_proj_gap=2, scale=0.25, projector="svd", backend=backend)
    opt1 = GaLoreAdamW(one.parameters(), lr=0.01, backend=backend)
    opt4 = GaLoreAdamW(four.parameters(), lr=0.01, backend=backend)
    gen = torch.Generator().manual_seed(4)
    for t in range(3):  # refreshes at steps 0 and 2
        x, y = torch.randn(16, 20, generator=gen).to(DEV), torch.randn(16, 17, generator=gen).to(DEV)
        ((one(x) - y) ** 2).sum().backward()
        opt1.step()
        opt1.zero_grad()
        for i in range(4):
            ((four(x[i::4]) - y[i::4]) ** 2).sum().backward()
        opt4.step()
        four.zero_grad()  # model.zero_grad: the step already consumed R
        for pa, pb in zip(one.parameters(), four.parameters()):
            assert_close(pb, pa.detach().double(), torch.float32, f"step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_randomized_refresh_protocol(backend):
    # randomized projector: the first micro-batch of a refresh step sets the basis, the rest project on it;
    # R is the exact projection of the summed gradient on that basis
    lin = nn.Linear(24, 18).to(DEV)
    model = nn.Sequential(lin)
    fg.enable(model, ["0"], rank=4, update_proj_gap=3, projector="randomized", backend=backend)
    st = fg.galore_state(lin.weight)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(9, 24, generator=gen).to(DEV) for _ in range(3)]
    dys = [torch.randn(9, 18, generator=gen).to(DEV) for _ in range(3)]
    bases = []
    for x, dy in zip(xs, dys):
        model(x).backward(dy)
        bases.append((st.P, st.Q))
    assert st.refreshed and all(b is bases[0] or b == bases[0] for b in bases)
    g = sum(dy.double().t() @ x.double() for x, dy in zip(xs, dys))
    exp = pj.project(g.cpu(), *(None if t is None else t.double().cpu() for t in (st.P, st.Q)))
    assert_close(st.R, exp, torch.float32, "R over 3 micro-batches")
    # the basis is the range finder's on the first micro-batch's gradient: it captures most of that energy
    g1 = (dys[0].double().t() @ xs[0].double()).cpu()
    best = pj.project(g1, *(None if t is None else t.double() for t in pj.svd_basis(g1, 4, st.side))).norm()
    got = pj.project(g1, *(None if t is None else t.double().cpu() for t in (st.P, st.Q))).norm()
    assert got >= 0.9 * best
    assert lin.weight.grad is None


@pytest.mark.parametrize("backend", ["torch"])  # 20 interpreted steps are slow; Triton parity is tested above
def test_randomized_training_reduces_loss(backend):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(DEV)
    fg.enable(model, ["0", "2"], rank=4, update_proj_gap=5, moments="rotate", backend=backend)
    opt = GaLoreAdamW(model.parameters(), lr=0.05, backend=backend)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 16, generator=gen).to(DEV)
    y = torch.randn(64, 8, generator=gen).to(DEV)
    losses = []
    for _ in range(20):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_gradient_free(backend):
    base = _model(8)
    fg.enable(base, ["0", "2"], rank=3, update_proj_gap=2, projector="randomized", backend=backend)
    opt = GaLoreAdamW(base.parameters(), lr=0.01, backend=backend)
    gen = torch.Generator().manual_seed(9)
    data = [(torch.randn(11, 20, generator=gen).to(DEV), torch.randn(11, 17, generator=gen).to(DEV)) for _ in range(6)]

    def step(model, o, xy):
        ((model(xy[0]) - xy[1]) ** 2).sum().backward()
        o.step()
        o.zero_grad()

    for xy in data[:3]:
        step(base, opt, xy)
    buf = io.BytesIO()
    torch.save({"model": base.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    other = _model(99)
    fg.enable(other, ["0", "2"], rank=3, update_proj_gap=2, projector="randomized", backend=backend)
    other.load_state_dict(saved["model"])
    opt2 = GaLoreAdamW(other.parameters(), lr=0.01, backend=backend)
    opt2.load_state_dict(saved["opt"])
    st_a, st_b = fg.galore_state(base[0].weight), fg.galore_state(other[0].weight)
    for ta, tb in zip((st_a.P, st_a.Q), (st_b.P, st_b.Q)):
        assert (ta is None) == (tb is None) and (ta is None or torch.equal(ta, tb))
    assert st_b.refresh_due == st_a.refresh_due
    torch.manual_seed(10)  # the step-4 refresh draws its sketch seed from torch's generator
    for xy in data[3:]:
        step(base, opt, xy)
    torch.manual_seed(10)
    for xy in data[3:]:
        step(other, opt2, xy)
    for pa, pb in zip(base.parameters(), other.parameters()):
        assert torch.equal(pa, pb)


def test_zero_grad_discards_r():
    model = _model(11)
    fg.enable(model, ["2"], rank=2, projector="svd", update_proj_gap=1)
    opt = GaLoreAdamW(model.parameters(), lr=0.01)
    x = torch.randn(5, 20).to(DEV)
    model(x).sum().backward()
    st = fg.galore_state(model[2].weight)
    assert st.G is not None
    opt.zero_grad()
    assert st.G is None and not st.has_R
    w0 = model[2].weight.detach().clone()
    opt.step()  # nothing accumulated: the weight is not touched
    assert torch.equal(model[2].weight, w0)


def test_disable_restores_plain_linear():
    model = _model(12)
    x = torch.randn(4, 20).to(DEV)
    ref = model(x)
    fg.enable(model, ["0"], rank=2)
    fg.disable(model)
    assert fg.galore_state(model[0].weight) is None
    torch.testing.assert_close(model(x), ref)
    model(x).sum().backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(target_modules=["nope"], rank=2), ValueError, "matched no module"),
    (dict(target_modules=["1"], rank=2), TypeError, "nn.Linear"),
    (dict(target_modules=["0"], rank=0), ValueError, "rank"),
    (dict(target_modules=["0"], rank=21), ValueError, "rank"),
    (dict(target_modules=["0"], rank=2, proj_type="diag"), ValueError, "proj_type"),
    (dict(target_modules=["0"], rank=2, projector="qr"), ValueError, "projector"),
    (dict(target_modules=["0"], rank=2, moments="forget"), ValueError, "moments"),
    (dict(target_modules=["0"], rank=2, update_proj_gap=0), ValueError, "update_proj_gap"),
    (dict(target_modules=5, rank=2), TypeError, "target_modules"),
])
def test_enable_bad_input(kwargs, err, match):
    model = _model(13)
    with pytest.raises(err, match=match):
        fg.enable(model, **kwargs)
    assert all(fg.galore_state(m.weight) is None for m in model if isinstance(m, nn.Linear))
    assert "forward" not in model[0].__dict__


def test_enable_twice_and_rank_in_group():
    model = _model(14)
    fg.enable(model, ["0"], rank=2)
    with pytest.raises(ValueError, match="already"):
        fg.enable(model, ["0"], rank=2)
    with pytest.raises(ValueError, match="gradient-free"):
        GaLoreAdamW([{"params": [model[0].weight], "rank": 2}])
