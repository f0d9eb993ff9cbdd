"""backend="cublas" of the gradient-free GaLore linear (ops/galore_linear_cublas.py): the skinny dY·P (X·Qᵀ) by
Triton's shrink kernel, R accumulated by cuBLAS as its fp32 C input. Against float64: y, dX, dbias and R for
every projection side, fp32 and fp16 (bf16 on CUDA: the Triton interpreter computes bf16 dots wrongly), odd
shapes, M=1, non-contiguous X, W and dY, bias or none; micro-batch accumulation; a rank past the skinny kernel's
limit (cuBLAS then); the exact-SVD refresh's full G; agreement with the torch and triton backends; no [out, in]
allocation; errors with reasons. On the CPU torch.mm stands in for cuBLAS and the Triton kernel runs under the
interpreter.
"""
import pytest
import torch

import fastpeft
import fastpeft.galore as fg
from fastpeft.ops import galore_linear_cublas as gc
from fastpeft.ops.galore_linear import galore_linear
from fastpeft.optim import projector as pj
from tolerances import assert_close

from conftest import DEVICE

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _state(w, rank, side, gen, backend="cublas", dtype=None):
    st = fg.GaLoreLinearState(w.shape, rank, 10, 1.0, side, "svd", "keep", 8, 2, backend)
    p, q = pj.svd_basis(torch.randn(*w.shape, generator=gen), rank, side, dtype=dtype or w.dtype)
    st.P, st.Q = (None if t is None else t.to(DEVICE) for t in (p, q))
    st.refresh_due = False  # a fixed basis: these tests check the projection, not the refresh
    return st


def _run(x, w, b, st, dy):
    y = galore_linear(x, w, b, st)
    y.backward(dy)
    return y


def _expect_r(x, dy, st):
    out_f, in_f = st.shape
    g = dy.detach().double().cpu().reshape(-1, out_f).t() @ x.detach().double().cpu().reshape(-1, in_f)
    return pj.project(g, *(None if t is None else t.double().cpu() for t in (st.P, st.Q)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_against_float64(dtype, side):
    gen = torch.Generator().manual_seed(1)
    for lead, out_f, in_f, rank, bias in (((3, 7), 19, 27, 5, True), ((1,), 17, 12, 3, False)):  # odd; M = 1
        x = torch.randn(*lead, in_f + 4, generator=gen)[..., 2:in_f + 2].to(DEVICE, dtype).requires_grad_()
        w = torch.randn(out_f, in_f, generator=gen).to(DEVICE, dtype).requires_grad_()
        b = torch.randn(out_f, generator=gen).to(DEVICE, dtype).requires_grad_() if bias else None
        st = _state(w, rank, side, gen)
        dy = torch.randn(*lead, out_f, generator=gen).to(DEVICE, dtype)
        y = _run(x, w, b, st, dy)
        xd, wd, dyd = (t.detach().double().cpu() for t in (x, w, dy))
        assert_close(y, xd @ wd.t() + (b.detach().double().cpu() if bias else 0), dtype, "y")
        assert_close(x.grad, dyd @ wd, dtype, "dx")
        if bias:
            assert_close(b.grad, dyd.reshape(-1, out_f).sum(0), dtype, "dbias")
        assert w.grad is None and st.R.dtype == torch.float32
        assert_close(st.R, _expect_r(x, dy, st), dtype, f"R ({side})", k=x.numel() // in_f)


def test_layouts_accumulation_and_agreement_with_the_other_backends():
    """Transposed X, sliced W and dY, two micro-batches accumulated into R: the same R as the torch and triton
    backends and as float64."""
    gen = torch.Generator().manual_seed(2)
    out_f, in_f, m = 13, 22, 9
    x0 = torch.randn(2, in_f, m, generator=gen).to(DEVICE).transpose(1, 2)  # [2, m, in], column-major rows
    w0 = torch.randn(out_f, 2 * in_f, generator=gen).to(DEVICE)[:, ::2]
    dys = [torch.randn(m, 2 * out_f, generator=gen).to(DEVICE)[:, 1::2] for _ in range(2)]
    rs = {}
    for backend in ("cublas", "torch", "triton"):
        for side in ("left", "right", "full"):
            w = w0.detach().clone().requires_grad_()
            st = _state(w, 4, side, torch.Generator().manual_seed(3), backend)
            for i in range(2):
                _run(x0[i].detach().requires_grad_(), w, None, st, dys[i])
            rs[backend, side] = st.R
            if backend == "cublas":
                exp = sum(_expect_r(x0[i], dys[i], st) for i in range(2))
                assert_close(st.R, exp, torch.float32, f"R accumulated ({side})", k=2 * m)
    for side in ("left", "right", "full"):
        for other in ("torch", "triton"):
            torch.testing.assert_close(rs["cublas", side], rs[other, side], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_expanded_dy_from_sum(side):
    # y.sum().backward() hands the backward a stride-0 dY: the skinny kernel and cuBLAS read it as it is
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 9, generator=gen).to(DEVICE)
    w = torch.randn(11, 9, generator=gen).to(DEVICE).requires_grad_()
    st = _state(w, 2, side, gen)
    galore_linear(x, w, None, st).sum().backward()
    assert_close(st.R, _expect_r(x, torch.ones(10, 11), st), torch.float32, f"R ({side})")


def test_rank_past_the_skinny_kernel_takes_cublas(monkeypatch):
    from fastpeft.limits import LORA_MAX_RANK_TRITON

    monkeypatch.setattr(gc, "LORA_MAX_RANK_TRITON", 3)  # rank 4 > 3: dY·P by cuBLAS, not the shrink kernel
    import fastpeft.kernels.lora_linear as kl

    calls = []
    monkeypatch.setattr(kl, "lora_shrink", lambda *a: calls.append(1))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 10, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(8, 10, generator=gen).to(DEVICE).requires_grad_()
    st = _state(w, 4, "full", gen)
    dy = torch.randn(6, 8, generator=gen).to(DEVICE)
    _run(x, w, None, st, dy)
    assert not calls and LORA_MAX_RANK_TRITON >= 128
    assert_close(st.R, _expect_r(x, dy, st), torch.float32, "R (rank past the kernel)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_svd_refresh_full_gradient_and_empty_batch(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 12, generator=gen).to(DEVICE, dtype)
    w = torch.randn(9, 12, generator=gen).to(DEVICE, dtype).requires_grad_()
    st = fg.GaLoreLinearState(w.shape, 3, 10, 1.0, "std", "svd", "keep", 8, 2, "cublas")
    dy = torch.randn(7, 9, generator=gen).to(DEVICE, dtype)
    _run(x, w, None, st, dy)  # a refresh step of the exact-SVD projector: G is formed, by design
    g = dy.double().cpu().t() @ x.double().cpu()
    assert st.G.dtype == torch.float32
    assert_close(st.G, g, dtype, "G", k=7)
    _run(x[:0], w, None, st, dy[:0])  # an empty micro-batch adds nothing
    assert_close(st.G, g, dtype, "G after an empty batch", k=7)


def test_accumulate_f32_in_place():
    gen = torch.Generator().manual_seed(6)
    out = torch.randn(4, 5, generator=gen).to(DEVICE)
    ref = out.double().cpu()
    for dtype in (torch.float32, torch.float16):
        a = torch.randn(4, 11, generator=gen).to(DEVICE, dtype)
        b = torch.randn(5, 11, generator=gen).to(DEVICE, dtype).t()  # a transposed operand
        ptr = out.data_ptr()
        assert gc.accumulate_f32(out, a, b) is out and out.data_ptr() == ptr and out.dtype == torch.float32
        ref = ref + a.double().cpu() @ b.double().cpu()
        assert_close(out, ref, dtype, f"out += a·b ({dtype})", k=11)


def test_no_weight_sized_allocation():
    from alloc_recorder import AllocRecorder

    gen = torch.Generator().manual_seed(7)
    out_f, in_f, m = 24, 40, 7
    x = torch.randn(m, in_f, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(out_f, in_f, generator=gen).to(DEVICE).requires_grad_()
    st = _state(w, 3, "left", gen)
    y = galore_linear(x, w, None, st)
    with AllocRecorder() as rec:
        y.backward(torch.randn(m, out_f, generator=gen).to(DEVICE))
    rec.assert_below(out_f * in_f, "cublas backward")
    assert rec.allocations, "the recorder saw nothing"


def test_errors_say_why(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 6, generator=gen).double().to(DEVICE)
    w = torch.randn(4, 6, generator=gen).double().to(DEVICE).requires_grad_()
    st = _state(w, 2, "left", gen)
    with pytest.raises(fastpeft.BackendUnavailableError, match=r"backend='cublas' cannot run: dtype torch.float64"):
        galore_linear(x, w, None, st).sum().backward()
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        w = w.detach().float().requires_grad_()
        st = _state(w, 2, "left", gen)
        with pytest.raises(fastpeft.BackendUnavailableError, match=r"backend='cublas' cannot run: .*CUDA tensors"):
            galore_linear(x.float(), w, None, st).sum().backward()


def test_optimizer_with_cublas_trains_as_one_batch_and_as_torch():
    """GaLoreAdamW(backend="cublas") (projections and weight update by cuBLAS, Adam by the Triton kernel) over the
    cublas gradient-free linear: four micro-batches equal one batch, refresh steps included."""
    from test_galore_linear import test_accumulation_over_micro_batches_equals_one_batch as micro_batches

    micro_batches("cublas")


def test_optimizer_cublas_matches_torch_after_steps():
    import copy

    from torch import nn

    from fastpeft.optim import GaLoreAdamW

    gen = torch.Generator().manual_seed(8)
    base = nn.Sequential(nn.Linear(20, 17), nn.Tanh(), nn.Linear(17, 13)).to(DEVICE)
    models = {b: copy.deepcopy(base) for b in ("torch", "cublas")}
    opts = {}
    for b, m in models.items():
        fg.enable(m, ["0", "2"], rank=3, update_proj_gap=2, scale=0.25, projector="svd", backend=b)
        opts[b] = GaLoreAdamW(m.parameters(), lr=0.01, weight_decay=0.1, backend=b)
    for _ in range(3):
        x, y = torch.randn(9, 20, generator=gen).to(DEVICE), torch.randn(9, 13, generator=gen).to(DEVICE)
        for b, m in models.items():
            ((m(x) - y) ** 2).sum().backward()
            opts[b].step()
            m.zero_grad()
    for (n, pt), pc in zip(models["torch"].named_parameters(), models["cublas"].parameters()):
        assert_close(pc, pt.detach().double(), torch.float32, f"{n} after 3 steps")
