"""Issue 13, bounded temporaries: every reduction of the Triton backwards runs on a fixed number of programs along
the reduced dimension, so its fp32 partials stay within one output plus kernels/common.py PARTIAL_BUDGET,
whatever M (the row count). Checked on the CPU (Triton's interpreter) by recording every allocation
(tests/alloc_recorder.py) at shapes where one partial per row block, as before, would be far larger, with the
budget lowered so the bounded paths run at interpreter sizes; the results still match float64 references.

Under the interpreter target_programs() is 4, so a reduction takes at most 4 programs (fewer where the other
grid dimensions already reach 4): each bound below is programs · (one partial) · 4 bytes.
"""
import math

import pytest
import torch

import fastpeft  # noqa: F401  (maps kernels/ to fastpeft.kernels)
from alloc_recorder import AllocRecorder
from reference_lora import reference_with_grads
from tolerances import assert_close

from conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's program counts are assumed")
BUDGET = 4096  # bytes: PARTIAL_BUDGET lowered so interpreter-sized shapes take the bounded paths
PROGRAMS = 4  # target_programs() under the interpreter


@pytest.fixture
def small_budget(monkeypatch):
    from fastpeft.kernels import common

    monkeypatch.setattr(common, "PARTIAL_BUDGET", BUDGET)


def _temporaries(rec, allowed_shapes):
    """Allocations other than the outputs and activations (exact shapes in allowed_shapes), largest first."""
    allowed = {tuple(s) for s in allowed_shapes}
    return sorted((a for a in rec.allocations if a.shape not in allowed), key=lambda a: -a.numel)


def _assert_bounded(rec, allowed_shapes, bound_bytes, old_bytes, what):
    temps = _temporaries(rec, allowed_shapes)
    assert rec.allocations, "the recorder saw nothing"
    big = [a for a in temps if a.numel * a.dtype.itemsize > bound_bytes]
    assert not big, f"{what}: temporaries over {bound_bytes} bytes: " + "; ".join(
        f"{a.op} {list(a.shape)} {a.dtype}" for a in big[:5])
    assert bound_bytes * 4 <= old_bytes, "the shape does not separate the bound from one partial per row block"


def test_lora_backward_partials_bounded(small_budget):
    from fastpeft.kernels import lora_linear as k

    M, K, N, R, scaling = 1024, 40, 48, 4, 0.75
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    a = torch.randn(R, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, R, generator=g)
    bias = torch.randn(N, generator=g)
    dy = torch.randn(M, N, generator=g)
    s = k.lora_shrink(x, a, 0.0, 0, 0)
    with AllocRecorder() as rec:
        dx, da, db, dbias = k.lora_linear_bwd(dy, x, w, a, b, s, scaling, 0.0, 0, 0, (True, True, True, True))
    # the old dY kernel wrote [cdiv(M, 16), N, R] and [cdiv(M, 16), N]; now the dB kernel runs min(4 programs,
    # cdiv(4, column tiles)) along M: [2, N, R] and [2, N]; dA [2, R, K]; dS one split (the output itself)
    bound = PROGRAMS * max(N * R, R * K) * 4
    _assert_bounded(rec, [(M, K), (M, N), (M, R), (1, M, R)], bound, triton_cdiv(M, 16) * N * R * 4, "LoRA backward")
    _, (dx64, _, da64, db64, dbias64) = reference_with_grads(x, w, a, b, bias, scaling, dy)
    assert_close(dx, dx64, torch.float32, "dx", k=N)
    assert_close(da, da64, torch.float32, "dA", k=M)
    assert_close(db, db64, torch.float32, "dB", k=M)
    assert_close(dbias, dbias64, torch.float32, "dbias", k=M)
    # bit-stable: the same result on a second run
    again = k.lora_linear_bwd(dy, x, w, a, b, s, scaling, 0.0, 0, 0, (True, True, True, True))
    for got, ref in zip(again, (dx, da, db, dbias)):
        assert torch.equal(got, ref)


def triton_cdiv(a, b):
    return -(-a // b)


def test_lora_db_kernel_matches_fused_pass():
    """With the default budget small M takes the fused one-pass dY kernel: both paths agree."""
    from fastpeft.kernels import common
    from fastpeft.kernels import lora_linear as k

    g = torch.Generator().manual_seed(1)
    M, N, R = 77, 45, 5
    dy, s, b = torch.randn(M, N, generator=g), torch.randn(M, R, generator=g), torch.randn(N, R, generator=g)
    fused = k.lora_bwd_dy(dy, b, s, 0.5, True, True, True)
    saved = common.PARTIAL_BUDGET
    common.PARTIAL_BUDGET = 0
    try:
        split = k.lora_bwd_dy(dy, b, s, 0.5, True, True, True)
    finally:
        common.PARTIAL_BUDGET = saved
    for got, ref, name in zip(split, fused, ("dS", "dB", "dbias")):
        assert_close(got, ref.double(), torch.float32, name, k=M)


def test_multi_lora_backward_partials_bounded(small_budget):
    from fastpeft.ops.multi_lora import multi_lora_linear
    from test_multi_lora import loop_reference

    M, K, N = 1024, 40, 48
    ranks, offsets = [4, 8, 2], [0, 4, 12]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    a = torch.randn(14, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, 14, generator=g) / 2
    x = torch.randn(M, K, generator=g)
    dy = torch.randn(M, N, generator=g)
    # runs of tokens per adapter (sequences), some base-only: adapters span many segment tiles, cut by the splits
    ids = torch.tensor([(i // 100) % 4 - 1 for i in range(M)])
    scalings = [0.5, 1.25, 0.75]
    xl, al, bl = (t.clone().requires_grad_(True) for t in (x, a, b))
    with AllocRecorder() as rec:
        y = multi_lora_linear(xl, w, al, bl, ids, scalings, ranks, offsets, backend="triton")
        y.backward(dy)
    # before: [cdiv(M, 16) + 3, D, r_max] per reduction (67 segment tiles); now [2·splits, D, r_max], splits <= 2
    r_max = max(ranks)
    bound = 2 * 2 * max(N, K) * r_max * 4
    _assert_bounded(rec, [(M, K), (M, N), (M, r_max), (M,), (3, 67), (N, 14), (14, K)], bound,
                    (triton_cdiv(M, 16) + 3) * N * r_max * 4, "multi-LoRA backward")
    y64, dx64, da64, db64 = loop_reference(x, w, a, b, None, ids, scalings, ranks, offsets, dy)
    assert_close(y, y64, torch.float32, "y", k=K)
    assert_close(xl.grad, dx64, torch.float32, "dx", k=N)
    assert_close(al.grad, da64, torch.float32, "dA", k=M)
    assert_close(bl.grad, db64, torch.float32, "dB", k=M)


@pytest.mark.parametrize("mode", ["output", "input"])
def test_ia3_backward_partials_bounded(monkeypatch, mode):
    from fastpeft.kernels import common
    from fastpeft.ops.ia3 import ia3_linear

    budget = 1024
    monkeypatch.setattr(common, "PARTIAL_BUDGET", budget)
    M, K, N = 1024, 40, 48
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    bias = torch.randn(N, generator=g)
    scale = torch.rand(N if mode == "output" else K, generator=g) + 0.5
    dy = torch.randn(M, N, generator=g)
    xl, sl = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    with AllocRecorder() as rec:
        y = ia3_linear(xl, w, bias, sl, mode, backend="triton")
        y.backward(dy)
    # before: [cdiv(M, 16), D] (64 rows); now row chunks of 1 + budget / (4·D) row blocks
    d = scale.shape[0]
    bound = (1 + budget // (4 * d)) * d * 4
    _assert_bounded(rec, [(M, K), (M, N)], bound, triton_cdiv(M, 16) * d * 4, f"IA3 backward ({mode})")
    x64, w64, b64, dy64 = x.double(), w.double(), bias.double(), dy.double()
    s64 = scale.double().requires_grad_(True)
    xr = x64.clone().requires_grad_(True)
    y64 = (xr @ w64.t() + b64) * s64 if mode == "output" else (xr * s64) @ w64.t() + b64
    y64.backward(dy64)
    assert_close(y, y64, torch.float32, "y", k=K)
    assert_close(xl.grad, xr.grad, torch.float32, "dx", k=N)
    assert_close(sl.grad, s64.grad, torch.float32, "dl", k=M)


def test_adapter_backward_partials_bounded(monkeypatch):
    from fastpeft.kernels import adapter as k
    from fastpeft.kernels import common

    budget = 256
    monkeypatch.setattr(common, "PARTIAL_BUDGET", budget)
    M, D, A, scaling = 1024, 40, 8, 0.5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, D, generator=g)
    wd = torch.randn(A, D, generator=g) / math.sqrt(D)
    bd = torch.randn(A, generator=g)
    wu = torch.randn(D, A, generator=g) / math.sqrt(A)
    bu = torch.randn(D, generator=g)
    dy = torch.randn(M, D, generator=g)
    y, z = k.adapter_fwd(x, None, wd, bd, wu, bu, scaling, "relu", store_z=True)
    with AllocRecorder() as rec:
        dx, dwd, dbd, dwu, dbu = k.adapter_bwd(dy, x, z, wd, wu, scaling, "relu", skip=True, need_dx=True,
                                               need_dw=True)
    # before: dbd partials [cdiv(M, 16), A] (and 2 splits of the weight partials); now row chunks of
    # 1 + budget / (4·A) row blocks, and one split, the weight gradients themselves ([1, D, A], [1, A, D], [1, D])
    bound = (1 + budget // (4 * A)) * A * 4
    _assert_bounded(rec, [(M, D), (M, 16), (A, D), (D, A), (1, D, A), (1, A, D), (1, D)], bound, triton_cdiv(M, 16) * A * 4,
                    "adapter backward")
    leaves = [t.double().requires_grad_(True) for t in (x, wd, bd, wu, bu)]
    x64, wd64, bd64, wu64, bu64 = leaves
    y64 = x64 + scaling * (torch.relu(x64 @ wd64.t() + bd64) @ wu64.t() + bu64)
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, "y", k=D)
    for got, ref, name in zip((dx, dwd, dbd, dwu, dbu), [t.grad for t in leaves], ("dx", "dWd", "dbd", "dWu", "dbu")):
        assert_close(got, ref, torch.float32, name, k=M)
