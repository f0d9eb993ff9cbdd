"""The CUDA ops of csrc/ on a GPU: each against a float64 reference (tests/cuda_reference.py) on odd shapes and
every dtype, every kernel's dropout mask bit-identical to fastpeft.dropout (the Triton backend's stream), strided
inputs, determinism, bad-input errors, torch.library.opcheck and torch.compile; the "cuda" backend of
fastpeft.lora_linear end to end against float64 and against backend="triton" with the same seed. Skipped
without CUDA (tests/test_cuda_build.py covers CI).
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from cuda_reference import DY_REDUCE_PATHS, bwd_da_ref, decode_ref, dy_reduce_ref, expand_ref
from tolerances import DTYPES, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU-only machine)")

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def ext():
    from fastpeft import _ext

    return _ext.load_extension()  # builds just in time if setup.py did not


def ops():
    from fastpeft.ops import cuda_ops

    return cuda_ops


def rnd(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype)


def poison_allocator(nbytes=64 << 20):
    """Fill a freed block of the caching allocator with NaN so that outputs which reuse it and are not
    fully written show up as non-finite."""
    junk = torch.full((nbytes // 4,), float("nan"), device=DEV)
    del junk


def strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t in another layout: 'contig', 'cols' (column stride 2), 'offset' (misaligned
    start), 'trans' (column-major)."""
    if kind == "contig":
        return t
    rows, cols = t.shape
    if kind == "cols":
        big = torch.empty(rows, 2 * cols, device=DEV, dtype=t.dtype)
        big[:, ::2] = t
        return big[:, ::2]
    if kind == "offset":
        big = torch.empty(rows, cols + 3, device=DEV, dtype=t.dtype)
        big[:, 1 : 1 + cols] = t
        return big[:, 1 : 1 + cols]
    if kind == "trans":
        return t.t().contiguous().t()
    raise ValueError(kind)


# --- lora_shrink -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, r", [(1, 64, 16), (37, 203, 16), (130, 517, 7), (65, 96, 48), (33, 80, 200)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_matches_float64(dtype, M, K, r, p):
    from fastpeft.dropout import dropout_keep_mask

    seed = 1234 + M
    x, a = rnd(M, K, dtype=dtype), rnd(r, K, dtype=dtype, scale=0.1)
    poison_allocator()
    s = ops().lora_shrink_cuda(x, a, p, seed)
    keep = dropout_keep_mask(seed, M, K, p, device=DEV)
    ref = (x.double() * keep / (1 - p)) @ a.double().t()
    assert s.dtype == dtype and s.shape == (M, r)
    assert_close(s, ref, dtype, f"S M={M} K={K} r={r} p={p}")


@pytest.mark.parametrize("layout_x, layout_a", [("cols", "contig"), ("offset", "trans"), ("trans", "offset")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shrink_strided_inputs(layout_x, layout_a, dtype):
    from fastpeft.dropout import dropout_keep_mask

    M, K, r, p, seed = 45, 131, 16, 0.2, 99
    x, a = rnd(M, K, dtype=dtype), rnd(r, K, dtype=dtype, scale=0.1)
    s = ops().lora_shrink_cuda(strided(x, layout_x), strided(a, layout_a), p, seed)
    ref = (x.double() * dropout_keep_mask(seed, M, K, p, device=DEV) / (1 - p)) @ a.double().t()
    assert_close(s, ref, dtype, f"S x:{layout_x} a:{layout_a}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "offset"])
@pytest.mark.parametrize("p, seed", [(0.1, 0), (0.5, 77), (0.9, 2**31 - 1)])
def test_shrink_mask_is_bit_identical(dtype, layout, p, seed):
    """x = 1 and A = I: S[m, k] != 0 exactly where the mask keeps (m, k)."""
    from fastpeft.dropout import dropout_keep_mask

    M, K = 1029, 203
    x = torch.ones(M, K, device=DEV, dtype=dtype)
    a = torch.eye(K, device=DEV, dtype=dtype)
    s = ops().lora_shrink_cuda(strided(x, layout), a, p, seed)
    keep = dropout_keep_mask(seed, M, K, p, device=DEV)
    assert torch.equal(s != 0, keep), f"mask mismatch at {(~((s != 0) == keep)).nonzero()[:5].tolist()}"
    kept = torch.tensor(1 / (1 - p), dtype=torch.float32).to(dtype)  # the kernel scales in fp32, rounds once
    assert torch.equal(s[keep], kept.to(DEV).expand(int(keep.sum())))


def test_shrink_seed_changes_the_mask():
    x, a = torch.ones(64, 64, device=DEV), torch.eye(64, device=DEV)
    m1 = ops().lora_shrink_cuda(x, a, 0.5, 1) != 0
    m2 = ops().lora_shrink_cuda(x, a, 0.5, 2) != 0
    assert not torch.equal(m1, m2)


# --- lora_dy_reduce --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, r", [(1, 40, 16), (53, 301, 16), (1000, 257, 5), (77, 515, 40), (33, 70, 256)])
def test_dy_reduce_matches_float64(dtype, M, N, r):
    dy, b, s = rnd(M, N, dtype=dtype), rnd(N, r, dtype=dtype, scale=0.1), rnd(M, r, dtype=dtype)
    scaling = 1.75
    poison_allocator()
    ds, db = ops().lora_dy_reduce_cuda(dy, b, s, scaling)
    assert ds.dtype == db.dtype == torch.float32
    assert_close(ds, scaling * dy.double() @ b.double(), dtype, f"dS M={M} N={N} r={r}")
    assert_close(db, scaling * dy.double().t() @ s.double(), dtype, f"dB M={M} N={N} r={r}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(DY_REDUCE_PATHS))
def test_dy_reduce_every_plan_path(dtype, case):
    """Each path of dy_reduce_plan (on 108 or 132 SMs; tests/test_cuda_build.py checks which shape takes which): one
    pass or two, dS and dB through fp32 partials or written directly, column ranges of several chunks (dS summed
    over them in place), rank slices; against float64 with a negative scaling, and bitwise reproducible."""
    (M, N, r), _ = DY_REDUCE_PATHS[case]
    dy, b, s = rnd(M, N, dtype=dtype), rnd(N, r, dtype=dtype, scale=0.1), rnd(M, r, dtype=dtype)
    poison_allocator()
    ds, db = ops().lora_dy_reduce_cuda(dy, b, s, -1.25)
    ds_ref, db_ref = dy_reduce_ref(dy, b, s, -1.25)
    assert ds.dtype == db.dtype == torch.float32
    assert_close(ds, ds_ref, dtype, f"dS {case} M={M} N={N} r={r}", k=N)
    assert_close(db, db_ref, dtype, f"dB {case} M={M} N={N} r={r}", k=M)
    ds2, db2 = ops().lora_dy_reduce_cuda(dy, b, s, -1.25)
    assert torch.equal(ds, ds2) and torch.equal(db, db2), "the reduction must be bitwise reproducible"


@pytest.mark.parametrize("layout", ["cols", "offset", "trans"])
def test_dy_reduce_strided_and_deterministic(layout):
    dtype, M, N, r = torch.float16, 517, 389, 16
    dy, b, s = rnd(M, N, dtype=dtype), rnd(N, r, dtype=dtype, scale=0.1), rnd(M, r, dtype=dtype)
    ds, db = ops().lora_dy_reduce_cuda(strided(dy, layout), strided(b, layout), strided(s, layout), 2.0)
    assert_close(ds, 2.0 * dy.double() @ b.double(), dtype, f"dS {layout}")
    assert_close(db, 2.0 * dy.double().t() @ s.double(), dtype, f"dB {layout}")
    ds2, db2 = ops().lora_dy_reduce_cuda(strided(dy, layout), strided(b, layout), strided(s, layout), 2.0)
    assert torch.equal(ds, ds2) and torch.equal(db, db2), "the reduction must be bitwise reproducible"


# --- rank_update -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, r", [(1, 8, 1), (67, 203, 16), (130, 257, 33), (64, 128, 256)])
def test_rank_update_matches_float64(dtype, N, K, r):
    w, b, a = rnd(N, K, dtype=dtype), rnd(N, r, dtype=dtype, scale=0.3), rnd(r, K, dtype=dtype, scale=0.3)
    w0, c = w.clone(), -0.625
    out = ops().rank_update_cuda_(w, b, a, c)
    assert out is w
    assert_close(w, w0.double() + c * b.double() @ a.double(), dtype, f"W N={N} K={K} r={r}")


@pytest.mark.parametrize("layout", ["cols", "offset", "trans"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rank_update_strided_touches_only_w(layout, dtype):
    N, K, r = 75, 141, 8
    base = rnd(N, 2 * K + 3, dtype=dtype)
    region = torch.zeros(N, 2 * K + 3, dtype=torch.bool, device=DEV)
    index = {"cols": (slice(None), slice(0, 2 * K, 2)), "offset": (slice(None), slice(1, 1 + K))}.get(layout)
    if index is None:  # column-major w: all of its storage is w
        w = rnd(K, N, dtype=dtype).t()
    else:
        w = base[index]
        region[index] = True
    b, a = rnd(N, r, dtype=dtype, scale=0.3), rnd(r, K, dtype=dtype, scale=0.3)
    before, w0 = base.clone(), w.clone()
    ops().rank_update_cuda_(w, b, a, 0.5)
    assert_close(w, w0.double() + 0.5 * b.double() @ a.double(), dtype, f"W {layout}")
    assert torch.equal(base[~region], before[~region]), "elements outside w were written"


# --- lora_decode -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("N, K, r", [(77, 203, 16), (300, 512, 7), (65, 96, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_decode_matches_float64(dtype, M, N, K, r, with_bias):
    x, w = rnd(M, K, dtype=dtype), rnd(N, K, dtype=dtype, scale=0.1)
    a, b = rnd(r, K, dtype=dtype, scale=0.1), rnd(N, r, dtype=dtype, scale=0.1)
    bias = rnd(N, dtype=dtype) if with_bias else None
    poison_allocator()
    y, s = ops().lora_decode_cuda(x, w, bias, a, b, 2.0)
    ref, s_ref = decode_ref(x, w, bias, a, b, 2.0)
    assert y.dtype == s.dtype == dtype and y.shape == (M, N) and s.shape == (M, r)
    assert_close(y, ref, dtype, f"y M={M} N={N} K={K} r={r}")
    assert_close(s, s_ref, dtype, f"S M={M} N={N} K={K} r={r}")


@pytest.mark.parametrize("layout", ["cols", "offset", "trans"])
def test_decode_strided_inputs(layout):
    dtype, M, N, K, r = torch.bfloat16, 3, 99, 161, 16
    x, w = rnd(M, K, dtype=dtype), rnd(N, K, dtype=dtype, scale=0.1)
    a, b, bias = rnd(r, K, dtype=dtype, scale=0.1), rnd(N, r, dtype=dtype, scale=0.1), rnd(N, dtype=dtype)
    y, s = ops().lora_decode_cuda(strided(x, layout), strided(w, layout), bias[None].expand(2, N)[0],
                                  strided(a, layout), strided(b, layout), 0.5, 0.25, 17)
    ref, s_ref = decode_ref(x, w, bias, a, b, 0.5, 0.25, 17)
    assert_close(y, ref, dtype, f"y {layout}")
    assert_close(s, s_ref, dtype, f"S {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_decode_every_m_with_and_without_dropout(dtype, p):
    """M = 1..16, one launch each: y and S against float64, r > the kernel's rank slice (two passes), odd K."""
    N, K, r, seed = 97, 203, 40, 2024
    w, b, bias = rnd(N, K, dtype=dtype, scale=0.1), rnd(N, r, dtype=dtype, scale=0.1), rnd(N, dtype=dtype)
    a = rnd(r, K, dtype=dtype, scale=0.1)
    for M in range(1, 17):
        x = rnd(M, K, dtype=dtype)
        y, s = ops().lora_decode_cuda(x, w, bias, a, b, 1.5, p, seed + M)
        ref, s_ref = decode_ref(x, w, bias, a, b, 1.5, p, seed + M)
        assert_close(y, ref, dtype, f"y M={M} p={p}")
        assert_close(s, s_ref, dtype, f"S M={M} p={p}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, seed", [(0.1, 0), (0.6, 2**31 - 1)])
def test_decode_mask_is_bit_identical(dtype, p, seed):
    """x = 1 and A = I: S[m, k] != 0 exactly where the mask keeps (m, k); w = 0 and b = 0 leave y = bias."""
    from fastpeft.dropout import dropout_keep_mask

    M, K, N = 16, 203, 40
    x, a = torch.ones(M, K, device=DEV, dtype=dtype), torch.eye(K, device=DEV, dtype=dtype)
    w, b, bias = torch.zeros(N, K, device=DEV, dtype=dtype), torch.zeros(N, K, device=DEV, dtype=dtype), rnd(N, dtype=dtype)
    y, s = ops().lora_decode_cuda(x, w, bias, a, b, 1.0, p, seed)
    keep = dropout_keep_mask(seed, M, K, p, device=DEV)
    assert torch.equal(s != 0, keep), f"mask mismatch at {(~((s != 0) == keep)).nonzero()[:5].tolist()}"
    assert torch.equal(y, bias.expand(M, N))


def test_decode_without_outputs_still_writes_s():
    x, a = rnd(3, 40, dtype=torch.float16), rnd(8, 40, dtype=torch.float16)
    w, b = rnd(0, 40, dtype=torch.float16), rnd(0, 8, dtype=torch.float16)
    y, s = ops().lora_decode_cuda(x, w, None, a, b, 1.0, 0.2, 5)
    assert y.shape == (3, 0)
    assert_close(s, decode_ref(x, w, None, a, b, 1.0, 0.2, 5)[1], torch.float16, "S with out_features=0")


# --- lora_expand -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, r", [(1, 40, 16), (67, 203, 16), (130, 517, 7), (65, 96, 100), (17, 300, 256)])
@pytest.mark.parametrize("fwd", [True, False])
def test_expand_matches_float64(dtype, M, N, r, fwd):
    """fwd: C = s·S·Bᵀ + bias (rm = b.t(), the transposed staging); else keep⊙(dS·A)/(1-p) (rm = a, row staging)."""
    l_mat = rnd(M, r, dtype=dtype)
    if fwd:
        b, bias = rnd(N, r, dtype=dtype, scale=0.1), rnd(N, dtype=dtype)
        rm, scale, p, seed = b.t(), 1.75, 0.0, 0
    else:
        rm, bias, p, seed = rnd(r, N, dtype=dtype, scale=0.1), None, 0.3, 4321 + M
        scale = 1 / (1 - p)
    poison_allocator()
    out = ops().lora_expand_cuda(l_mat, rm, bias, scale, p, seed)
    assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous()
    assert_close(out, expand_ref(l_mat, rm, bias, scale, p, seed), dtype, f"expand M={M} N={N} r={r} fwd={fwd}", k=r)


@pytest.mark.parametrize("layout_l, layout_rm", [("cols", "contig"), ("offset", "trans"), ("trans", "offset"),
                                                 ("contig", "cols")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_expand_strided_inputs(layout_l, layout_rm, dtype):
    M, N, r, p, seed = 45, 131, 16, 0.2, 99
    l_mat, rm, bias = rnd(M, r, dtype=dtype), rnd(r, N, dtype=dtype, scale=0.1), rnd(N, dtype=dtype)
    out = ops().lora_expand_cuda(strided(l_mat, layout_l), strided(rm, layout_rm), bias[None].expand(3, N)[1], 0.5,
                                 p, seed)
    assert_close(out, expand_ref(l_mat, rm, bias, 0.5, p, seed), dtype, f"expand l:{layout_l} rm:{layout_rm}", k=r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, seed", [(0.1, 0), (0.5, 77), (0.9, 2**31 - 1)])
def test_expand_mask_is_bit_identical(dtype, p, seed):
    """l = 1 and rm = 1 (rank 1): OUT != 0 exactly where the mask keeps (m, n), and kept values are scale."""
    from fastpeft.dropout import dropout_keep_mask

    M, N = 1029, 203
    out = ops().lora_expand_cuda(torch.ones(M, 1, device=DEV, dtype=dtype), torch.ones(1, N, device=DEV, dtype=dtype),
                                 None, 1 / (1 - p), p, seed)
    keep = dropout_keep_mask(seed, M, N, p, device=DEV)
    assert torch.equal(out != 0, keep), f"mask mismatch at {(~((out != 0) == keep)).nonzero()[:5].tolist()}"
    kept = torch.tensor(1 / (1 - p), dtype=torch.float32).to(dtype)
    assert torch.equal(out[keep], kept.to(DEV).expand(int(keep.sum())))


# --- lora_bwd_da -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, r", [(1, 64, 16), (37, 203, 16), (1000, 203, 16), (130, 517, 7), (77, 96, 48),
                                     (33, 80, 200), (40, 16400, 64)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bwd_da_matches_float64(dtype, M, K, r, p):
    """Row ranges with fp32 partials (M=1000: many) and without (r·K > 2**20: one range writes dA)."""
    seed = 555 + M
    x, ds = rnd(M, K, dtype=dtype), rnd(M, r, dtype=dtype, scale=0.1)
    poison_allocator()
    da = ops().lora_bwd_da_cuda(x, ds, p, seed)
    assert da.dtype == torch.float32 and da.shape == (r, K)
    assert_close(da, bwd_da_ref(x, ds, p, seed), dtype, f"dA M={M} K={K} r={r} p={p}", k=M)


@pytest.mark.parametrize("layout", ["cols", "offset", "trans"])
def test_bwd_da_strided_and_deterministic(layout):
    dtype, M, K, r, p, seed = torch.bfloat16, 517, 389, 16, 0.25, 31
    x, ds = rnd(M, K, dtype=dtype), rnd(M, r, dtype=dtype, scale=0.1)
    da = ops().lora_bwd_da_cuda(strided(x, layout), strided(ds, layout), p, seed)
    assert_close(da, bwd_da_ref(x, ds, p, seed), dtype, f"dA {layout}", k=M)
    da2 = ops().lora_bwd_da_cuda(strided(x, layout), strided(ds, layout), p, seed)
    assert torch.equal(da, da2), "the reduction must be bitwise reproducible"


@pytest.mark.parametrize("dtype", DTYPES)
def test_bwd_da_mask_is_bit_identical(dtype):
    """x = 1 and dS = I (r = M): dA[m, k] != 0 exactly where the mask keeps (m, k)."""
    from fastpeft.dropout import dropout_keep_mask

    M, K, p, seed = 200, 1029, 0.4, 8
    da = ops().lora_bwd_da_cuda(torch.ones(M, K, device=DEV, dtype=dtype), torch.eye(M, device=DEV, dtype=dtype), p, seed)
    keep = dropout_keep_mask(seed, M, K, p, device=DEV)
    assert torch.equal(da != 0, keep), f"mask mismatch at {(~((da != 0) == keep)).nonzero()[:5].tolist()}"


def test_bwd_da_empty_m_is_zero():
    da = ops().lora_bwd_da_cuda(rnd(0, 40, dtype=torch.float16), rnd(0, 4, dtype=torch.float16), 0.2, 1)
    assert da.shape == (4, 40) and torch.equal(da, torch.zeros_like(da))


# --- the "cuda" backend of fastpeft.lora_linear ----------------------------------------------------------
def _lora_case(M, K, N, r, dtype, x_layout="contig"):
    x = strided(rnd(M, K, dtype=dtype), x_layout).requires_grad_()
    w = rnd(N, K, dtype=dtype, scale=0.1).requires_grad_()
    a, b = rnd(r, K, dtype=torch.float32, scale=0.1).requires_grad_(), rnd(N, r, dtype=torch.float32, scale=0.1).requires_grad_()
    bias = rnd(N, dtype=dtype).requires_grad_()
    return x, w, a, b, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, x_layout", [(1, "contig"), (11, "cols"), (16, "trans"), (17, "contig"), (333, "offset")])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_cuda_backend_matches_float64(dtype, M, x_layout, p):
    """Forward y and every gradient (dX, dW frozen: none; dA, dB, dbias) against float64, decode (M <= 16) and
    general path, dropout on and off, fp32 adapters over 16-bit x, strided x."""
    from reference_lora import reference_with_grads

    from fastpeft import lora_linear

    K, N, r, scaling, seed = 203, 77, 16, 1.5, 9876
    x, w, a, b, bias = _lora_case(M, K, N, r, dtype, x_layout)
    w.requires_grad_(False)
    dy = rnd(M, N, dtype=dtype)
    y = lora_linear(x, w, a, b, scaling, bias=bias, dropout_p=p, seed=seed, backend="cuda")
    y.backward(dy)
    y_ref, (gx, _, ga, gb, gbias) = reference_with_grads(x, w, a, b, bias, scaling, dy, p, seed)
    assert_close(y, y_ref, dtype, f"y M={M} p={p}", k=K)
    assert_close(x.grad, gx, dtype, f"dX M={M} p={p}", k=N)
    assert_close(a.grad, ga, dtype, f"dA M={M} p={p}", k=max(M, N))
    assert_close(b.grad, gb, dtype, f"dB M={M} p={p}", k=max(M, K))
    assert_close(bias.grad, gbias, dtype, f"dbias M={M} p={p}", k=M)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [5, 300])
def test_lora_linear_cuda_backend_uses_the_triton_mask(dtype, M):
    """The same seed gives the same mask as backend='triton': outputs and gradients agree to rounding (a different
    mask would differ by the dropped terms, far beyond the tolerance), with p = 0.5 so that half the terms drop."""
    from fastpeft import lora_linear

    K, N, r, p, seed = 160, 96, 8, 0.5, 31337
    results = []
    for backend in ("cuda", "triton"):
        torch.manual_seed(0)
        x, w, a, b, bias = _lora_case(M, K, N, r, dtype)
        dy = rnd(M, N, dtype=dtype)
        y = lora_linear(x, w, a, b, 2.0, bias=bias, dropout_p=p, seed=seed, backend=backend)
        y.backward(dy)
        results.append((y.detach(), x.grad, a.grad, b.grad))
    for name, c, t in zip(("y", "dX", "dA", "dB"), *results):
        assert_close(c, t.double(), dtype, f"{name}: cuda vs triton, M={M}")


def test_cuda_backend_refuses_a_tensor_seed_inside_capture():
    from fastpeft.ops.lora_linear_cuda import _host_seed

    assert _host_seed(torch.tensor(12, device=DEV)) == 12 and _host_seed(7) == 7
    graph, seed = torch.cuda.CUDAGraph(), torch.tensor(3, device=DEV)
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        with torch.cuda.graph(graph):  # torch.cuda.graph captures on a side stream of its own
            _host_seed(seed)


# --- errors ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_any_launch():
    o = ops()
    x, a = rnd(8, 32, dtype=torch.float16), rnd(4, 32, dtype=torch.float16)
    with pytest.raises(TypeError, match="a: expected dtype"):
        o.lora_shrink_cuda(x, a.float(), 0.1, 1)
    with pytest.raises(ValueError, match="a: expected size 32 in dim 1"):
        o.lora_shrink_cuda(x, rnd(4, 31, dtype=torch.float16), 0.1, 1)
    with pytest.raises(ValueError, match=r"rank in \[1, 256\]"):
        o.lora_shrink_cuda(x, rnd(257, 32, dtype=torch.float16), 0.1, 1)
    with pytest.raises(ValueError, match="p: expected"):
        o.lora_shrink_cuda(x, a, 1.0, 1)
    with pytest.raises(ValueError, match="seed: expected"):
        o.lora_shrink_cuda(x, a, 0.1, 2**31)
    with pytest.raises(TypeError, match="x: expected dtype float32, float16 or bfloat16"):
        o.lora_shrink_cuda(x.double(), a.double(), 0.1, 1)
    with pytest.raises(ValueError, match="a: expected a CUDA tensor"):
        o.lora_shrink_cuda(x, a.cpu(), 0.1, 1)
    with pytest.raises(ValueError, match="s_mat: expected size 8 in dim 0"):
        o.lora_dy_reduce_cuda(x, rnd(32, 4, dtype=torch.float16), rnd(9, 4, dtype=torch.float16), 1.0)
    with pytest.raises(ValueError, match="at most 16 rows"):
        o.lora_decode_cuda(rnd(17, 32, dtype=torch.float16), x, None, a, rnd(8, 4, dtype=torch.float16), 1.0)
    with pytest.raises(ValueError, match="seed: expected"):
        o.lora_decode_cuda(x[:2], x, None, a, rnd(8, 4, dtype=torch.float16), 1.0, 0.1, -1)
    with pytest.raises(ValueError, match="rm: expected size 4 in dim 0"):
        o.lora_expand_cuda(rnd(8, 4, dtype=torch.float16), rnd(5, 9, dtype=torch.float16), None, 1.0)
    with pytest.raises(TypeError, match="bias: expected dtype torch.float16"):
        o.lora_expand_cuda(rnd(8, 4, dtype=torch.float16), rnd(4, 9, dtype=torch.float16), rnd(9, dtype=torch.float32), 1.0)
    with pytest.raises(ValueError, match="p: expected"):
        o.lora_bwd_da_cuda(x, rnd(8, 4, dtype=torch.float16), 1.0, 1)
    with pytest.raises(TypeError, match="ds: expected dtype"):
        o.lora_bwd_da_cuda(x, rnd(8, 4, dtype=torch.float32), 0.1, 1)
    w = rnd(40, 32, dtype=torch.float16)
    w0 = w.clone()
    with pytest.raises(ValueError, match="must not share memory"):
        o.rank_update_cuda_(w, rnd(40, 4, dtype=torch.float16), w[:4], 1.0)
    with pytest.raises(ValueError, match="must not share memory"):
        o.rank_update_cuda_(rnd(1, 32, dtype=torch.float16).expand(40, 32), rnd(40, 4, dtype=torch.float16), a, 1.0)
    assert torch.equal(w, w0), "nothing may be written on an error path"


# --- torch.library ---------------------------------------------------------------------------------------
def test_opcheck_passes():
    dt = torch.bfloat16
    x, a = rnd(19, 72, dtype=dt), rnd(16, 72, dtype=dt)
    b, w = rnd(40, 16, dtype=dt), rnd(40, 72, dtype=dt)
    dy, s = rnd(19, 40, dtype=dt), rnd(19, 16, dtype=dt)
    f = torch.ops.fastpeft
    torch.library.opcheck(f.cuda_lora_shrink.default, (x, a, 0.25, 5))
    torch.library.opcheck(f.cuda_lora_dy_reduce.default, (dy, b, s, 1.5))
    torch.library.opcheck(f.cuda_rank_update.default, (w, b, a, 0.5))
    torch.library.opcheck(f.cuda_lora_decode.default, (x[:3], w, rnd(40, dtype=dt), a, b, 2.0, 0.0, 0))
    torch.library.opcheck(f.cuda_lora_decode.default, (x[:3], w, None, a, b, 2.0, 0.3, 9))
    torch.library.opcheck(f.cuda_lora_expand.default, (s, b.t(), rnd(40, dtype=dt), 2.0, 0.0, 0))
    torch.library.opcheck(f.cuda_lora_expand.default, (s, a, None, 1.25, 0.2, 4))
    torch.library.opcheck(f.cuda_lora_bwd_da.default, (x, s, 0.2, 4))


def test_ops_work_under_torch_compile():
    o = ops()
    dt = torch.float16
    x, a, b, w = rnd(12, 72, dtype=dt), rnd(16, 72, dtype=dt), rnd(40, 16, dtype=dt), rnd(40, 72, dtype=dt)

    def f(x, a, b, w):
        s = o.lora_shrink_cuda(x, a, 0.1, 7)
        ds, db = o.lora_dy_reduce_cuda(torch.ones(12, 40, device=DEV, dtype=dt), b, s, 2.0)
        y, s2 = o.lora_decode_cuda(x, w, None, a, b, 0.5, 0.1, 7)
        c = o.lora_expand_cuda(s, b.t(), None, 0.5)
        return y + 1, s2, ds, db, c, o.lora_bwd_da_cuda(x, ds.to(dt), 0.1, 7)

    eager = f(x, a, b, w)
    compiled = torch.compile(f, fullgraph=True)(x, a, b, w)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_compute_sanitizer_clean():
    script = (
        "import torch; from fastpeft.ops import cuda_ops as o\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    x=torch.randn(37,203,device='cuda').to(dt); a=torch.randn(17,203,device='cuda').to(dt)\n"
        "    b=torch.randn(77,17,device='cuda').to(dt); w=torch.randn(77,203,device='cuda').to(dt)\n"
        "    s=o.lora_shrink_cuda(x[:, 1:], a[:, 1:], 0.3, 5); o.lora_dy_reduce_cuda(torch.randn(37,77,device='cuda').to(dt), b, o.lora_shrink_cuda(x, a), 1.0)\n"
        "    o.lora_dy_reduce_cuda(torch.randn(2100,600,device='cuda').to(dt), torch.randn(600,256,device='cuda').to(dt), torch.randn(2100,256,device='cuda').to(dt), 0.5)  # two passes\n"
        "    o.rank_update_cuda_(w, b, a, 0.5); o.lora_decode_cuda(x[:5], w, None, a, b, 2.0, 0.2, 3)\n"
        "    o.lora_expand_cuda(s, b[:, 1:].t(), None, 2.0); o.lora_expand_cuda(x[:, :17], a, None, 1.5, 0.3, 4)\n"
        "    o.lora_bwd_da_cuda(x, x[:, :17], 0.3, 5); o.lora_bwd_da_cuda(x[:, 1:], x[:, :70], 0.0, 5)\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run(["compute-sanitizer", "--error-exitcode", "3", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
