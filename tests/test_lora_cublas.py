"""backend="cublas" of fastpeft.lora_linear (ops/lora_linear_cublas.py): cuBLAS GEMMs with the low-rank term as
their C input, written once by the Triton skinny kernel (kernels/lora_skinny.py), against the float64 reference:
the output and every gradient, with and without dropout (the mask the other backends draw from the same seed),
bias or none, odd shapes, M=1, non-contiguous inputs, fp32 and fp16 (bf16 on CUDA: the Triton interpreter
computes bf16 dots wrongly). On the CPU the Triton kernels run under the interpreter and torch.addmm stands in
for cuBLAS.
"""
import math

import pytest
import torch

import fastpeft
from fastpeft import lora_linear
from reference_lora import reference_with_grads
from tolerances import assert_close

from conftest import DEVICE

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (leading shape of x, in, out, r): odd sizes, M=1, an aligned case, 3-D input, r past one 16-wide block
SHAPES = [((37,), 45, 53, 5), ((1,), 33, 17, 3), ((40,), 64, 96, 16), ((2, 7), 24, 40, 8), ((19,), 72, 36, 20)]


def _inputs(lead, k, n, r, dtype, bias=True, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dt)

    return (rnd(*lead, k), rnd(n, k, scale=1 / math.sqrt(k)), rnd(r, k, scale=1 / math.sqrt(k), dt=adapter_dtype),
            rnd(n, r, scale=1 / math.sqrt(r), dt=adapter_dtype), rnd(n) if bias else None)


def _run(backend, x, w, a, b, bs, scaling, p, seed, dy, requires=(True, False, True, True, True)):
    leaves = [None if t is None else t.detach().clone().requires_grad_(req) for t, req in zip((x, w, a, b, bs), requires)]
    y = lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], scaling, bias=leaves[4], dropout_p=p, seed=seed,
                    backend=backend)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_float64_reference(dtype, shape, p):
    lead, k, n, r = shape
    x, w, a, b, bs = _inputs(lead, k, n, r, dtype, bias=(k % 2 == 1))
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y, grads = _run("cublas", x, w, a, b, bs, 1.75, p, 1234, dy)
    y_ref, grads_ref = reference_with_grads(x, w, a, b, bs, 1.75, dy, p, 1234)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dx", "dW", "dA", "dB", "dbias"), grads, grads_ref):
        if name == "dW":
            assert got is None
        elif ref is not None and got is not None:
            assert got.dtype == dtype, name
            assert_close(got, ref, dtype, name)
        else:
            assert got is None and name == "dbias" and bs is None, name


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_same_mask_and_result_as_the_torch_backend(p):
    x, w, a, b, bs = _inputs((29,), 40, 24, 6, torch.float32)
    dy = torch.randn(29, 24, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y_c, g_c = _run("cublas", x, w, a, b, bs, 0.5, p, 4321, dy)
    y_t, g_t = _run("torch", x, w, a, b, bs, 0.5, p, 4321, dy)
    torch.testing.assert_close(y_c, y_t, rtol=1e-5, atol=1e-5)
    for name, i in (("dx", 0), ("dA", 2), ("dB", 3), ("dbias", 4)):
        torch.testing.assert_close(g_c[i], g_t[i], rtol=1e-5, atol=1e-5, msg=name)
    if p > 0:  # another seed, another mask: the results differ
        y_o, _ = _run("cublas", x, w, a, b, bs, 0.5, p, 4322, dy)
        assert not torch.allclose(y_o, y_c)


def test_tensor_seed_gives_the_int_seed_mask():
    x, w, a, b, bs = _inputs((21,), 36, 20, 4, torch.float32)
    from fastpeft.ops.lora_linear_cublas import lora_linear_bwd_cublas, lora_linear_fwd_cublas
    from fastpeft.dropout import keep_threshold

    thr = keep_threshold(0.4)
    y_i, s_i = lora_linear_fwd_cublas(x, w, a, b, bs, 2.0, 0.4, 99, thr)
    y_t, s_t = lora_linear_fwd_cublas(x, w, a, b, bs, 2.0, 0.4, torch.tensor(99, device=DEVICE), thr)
    assert torch.equal(y_i, y_t) and torch.equal(s_i, s_t)
    dy = torch.randn(21, 20).to(DEVICE)
    g_i = lora_linear_bwd_cublas(dy, x, w, a, b, s_i, 2.0, 0.4, 99, thr, (True, True, True, True))
    g_t = lora_linear_bwd_cublas(dy, x, w, a, b, s_i, 2.0, 0.4, torch.tensor(99, device=DEVICE), thr, (True, True, True, True))
    for gi, gt in zip(g_i, g_t):
        assert torch.equal(gi, gt)


def test_non_contiguous_inputs():
    dtype = torch.float32
    x_full, w, a, b, bs = _inputs((23,), 2 * 33, 29, 6, dtype)
    cases = {
        "column-strided": x_full[:, ::2],
        "transposed": x_full[:, :33].t().contiguous().t(),
        "permuted-3d": torch.randn(33, 4, 5).to(DEVICE, dtype).permute(1, 2, 0),
    }
    w = w[:, :33].t().contiguous().t()  # column-major W0 as well
    a = a[:, :33].t().contiguous().t()
    b = b.t().contiguous().t()
    for name, x in cases.items():
        dy = torch.randn(*x.shape[:-1], 29).to(DEVICE, dtype)
        y, grads = _run("cublas", x, w, a, b, bs, 0.5, 0.2, 77, dy)
        y_ref, grads_ref = reference_with_grads(x, w, a, b, bs, 0.5, dy, 0.2, 77)
        assert_close(y, y_ref, dtype, f"{name}: y")
        for gname, i in (("dx", 0), ("dA", 2), ("dB", 3), ("dbias", 4)):
            assert_close(grads[i], grads_ref[i], dtype, f"{name}: {gname}")


def test_non_contiguous_grad_output_and_expanded_bias():
    dtype = torch.float32
    x, w, a, b, _ = _inputs((21,), 35, 26, 4, dtype)
    bs = torch.randn(1).to(DEVICE).expand(26)  # stride 0
    dy = torch.randn(26, 21).to(DEVICE, dtype).t()
    y = lora_linear(x, w, a, b, 2.0, bias=bs, backend="cublas")
    assert_close(y, reference_with_grads(x, w, a, b, bs, 2.0, dy)[0], dtype, "y")
    _, grads = _run("cublas", x, w, a, b, None, 2.0, 0.0, 0, dy)
    _, grads_ref = reference_with_grads(x, w, a, b, None, 2.0, dy, 0.0, 0)
    for gname, i in (("dx", 0), ("dA", 2), ("dB", 3)):
        assert_close(grads[i], grads_ref[i], dtype, gname)


def test_fp32_adapters_over_half_precision_base():
    dtype = torch.float16
    x, w, a, b, bs = _inputs((30,), 40, 24, 8, dtype, adapter_dtype=torch.float32)
    dy = torch.randn(30, 24).to(DEVICE, dtype)
    y, grads = _run("cublas", x, w, a, b, bs, 2.0, 0.1, 5, dy)
    y_ref, grads_ref = reference_with_grads(x, w, a, b, bs, 2.0, dy, 0.1, 5)
    assert y.dtype == dtype and grads[2].dtype == torch.float32 and grads[3].dtype == torch.float32
    assert_close(y, y_ref, dtype, "y")
    for gname, i in (("dx", 0), ("dA", 2), ("dB", 3)):
        assert_close(grads[i], grads_ref[i], dtype, gname)


@pytest.mark.parametrize("requires", [(False, False, True, True, True), (True, False, False, False, False),
                                      (False, False, False, True, False)], ids=["adapters-only", "input-only", "B-only"])
def test_only_needed_gradients(requires):
    dtype = torch.float32
    x, w, a, b, bs = _inputs((17,), 27, 22, 5, dtype)
    dy = torch.randn(17, 22).to(DEVICE, dtype)
    _, grads = _run("cublas", x, w, a, b, bs, 1.5, 0.3, 9, dy, requires=requires)
    _, grads_ref = reference_with_grads(x, w, a, b, bs, 1.5, dy, 0.3, 9)
    for name, req, got, ref in zip(("dx", "dW", "dA", "dB", "dbias"), requires, grads, grads_ref):
        if req:
            assert_close(got, ref, dtype, name)
        else:
            assert got is None, name


def test_inference_and_empty_rows():
    x, w, a, b, bs = _inputs((9,), 20, 12, 3, torch.float32)
    with torch.no_grad():
        y = lora_linear(x, w, a, b, 1.5, bias=bs, backend="cublas")
    assert_close(y, reference_with_grads(x, w, a, b, bs, 1.5, torch.zeros(9, 12))[0], torch.float32, "y")
    y0 = lora_linear(x[:0], w, a, b, 1.5, bias=bs, backend="cublas")
    assert y0.shape == (0, 12)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU message")
def test_explicit_cublas_on_cpu_without_interpreter_says_why(monkeypatch):
    x, w, a, b, _ = _inputs((5,), 8, 6, 2, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastpeft.BackendUnavailableError, match=r"backend='cublas' cannot run: .*CUDA tensors"):
        lora_linear(x, w, a, b, 1.0, backend="cublas")
    torch.testing.assert_close(lora_linear(x, w, a, b, 1.0), x @ w.t() + (x @ a.t()) @ b.t())  # auto: torch


def test_other_ops_refuse_cublas_with_the_reason():
    from fastpeft._backend import resolve_backend

    with pytest.raises(fastpeft.BackendUnavailableError, match="backend='cublas' cannot run: this op has no cuBLAS path"):
        resolve_backend("cublas", torch.device(DEVICE))


def test_rank_past_the_kernels_limit_says_why():
    from fastpeft.limits import LORA_MAX_RANK_TRITON
    from fastpeft.ops.lora_linear import resolve_lora_backend

    with pytest.raises(fastpeft.BackendUnavailableError, match=f"r={LORA_MAX_RANK_TRITON + 1} exceeds"):
        resolve_lora_backend("cublas", torch.device(DEVICE), LORA_MAX_RANK_TRITON + 1)
