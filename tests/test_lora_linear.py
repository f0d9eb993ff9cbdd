"""fastpeft.lora_linear against a float64 reference: forward and every gradient, both backends.

On CPU the Triton kernels run under the interpreter (tests/conftest.py); bf16 Triton runs on CUDA only,
because the interpreter computes bf16 dots wrongly. Shapes are small and odd so that every kernel meets
partial tiles; (40, 64, 96, 16)-like shapes are 16-byte aligned and take the tensor-descriptor path.
"""
import math

import pytest
import torch

import fastpeft
from fastpeft import lora_linear
from reference_lora import reference_with_grads
from tolerances import assert_close

from conftest import DEVICE

from fastpeft._backend import cuda_unavailable_reason

# the CUDA C++ backend joins on a GPU machine where fastpeft._C is built or can be built just in time
BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE == "cuda" and cuda_unavailable_reason(torch.device("cuda")) is None else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading shape of x, in, out, r): odd sizes, M=1, an aligned case, 3-D input, r past one 16-wide block
SHAPES = [((37,), 45, 53, 5), ((1,), 33, 17, 3), ((40,), 64, 96, 16), ((2, 7), 24, 40, 8), ((19,), 72, 36, 20)]


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter computes bf16 dots wrongly; bf16 Triton is tested on CUDA")


def _inputs(lead, k, n, r, dtype, bias=True, adapter_dtype=None, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    x = rnd(*lead, k)
    w = rnd(n, k, scale=1 / math.sqrt(k))
    a = rnd(r, k, scale=1 / math.sqrt(k), dt=adapter_dtype)
    b = rnd(n, r, scale=1 / math.sqrt(r), dt=adapter_dtype)  # B non-zero so the low-rank path is tested
    bs = rnd(n) if bias else None
    return x, w, a, b, bs


def _run(backend, x, w, a, b, bs, scaling, p, seed, dy, requires=(True, False, True, True, True)):
    leaves = []
    for t, req in zip((x, w, a, b, bs), requires):
        leaves.append(None if t is None else t.detach().clone().requires_grad_(req))
    y = lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], scaling, bias=leaves[4], dropout_p=p, seed=seed, backend=backend)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_float64_reference(backend, dtype, shape, p):
    _skip_unsupported(backend, dtype)
    lead, k, n, r = shape
    x, w, a, b, bs = _inputs(lead, k, n, r, dtype, bias=(k % 2 == 1))
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y, grads = _run(backend, x, w, a, b, bs, 1.75, p, 1234, dy)
    y_ref, grads_ref = reference_with_grads(x, w, a, b, bs, 1.75, dy, p, 1234)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close(y, y_ref, dtype, "y")
    for name, got, ref in zip(("dx", "dW", "dA", "dB", "dbias"), grads, grads_ref):
        if name == "dW":
            assert got is None  # frozen: no gradient computed
        elif ref is not None and got is not None:
            assert_close(got, ref, dtype, name)
        else:
            assert got is None and (name == "dbias" and bs is None), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dtype = torch.float32
    x_full, w, a, b, bs = _inputs((23,), 2 * 33, 29, 6, dtype)
    cases = {
        "column-strided": x_full[:, ::2],  # stride along in_features is 2
        "transposed": x_full[:, :33].t().contiguous().t(),  # column-major [M, K]
        "permuted-3d": torch.randn(33, 4, 5).to(DEVICE, dtype).permute(1, 2, 0),  # leading dims not mergeable
    }
    w = w[:, :33].contiguous()
    a = a[:, :33].t().contiguous().t()  # column-major A
    for name, x in cases.items():
        dy = torch.randn(*x.shape[:-1], 29).to(DEVICE, dtype)
        y, grads = _run(backend, x, w, a, b, bs, 0.5, 0.2, 77, dy)
        y_ref, grads_ref = reference_with_grads(x, w, a, b, bs, 0.5, dy, 0.2, 77)
        assert_close(y, y_ref, dtype, f"{name}: y")
        for gname, i in (("dx", 0), ("dA", 2), ("dB", 3), ("dbias", 4)):
            assert_close(grads[i], grads_ref[i], dtype, f"{name}: {gname}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grad_output(backend):
    dtype = torch.float32
    x, w, a, b, bs = _inputs((21,), 35, 26, 4, dtype)
    dy = torch.randn(26, 21).to(DEVICE, dtype).t()  # a column-major upstream gradient
    y, grads = _run(backend, x, w, a, b, bs, 2.0, 0.0, 0, dy)
    _, grads_ref = reference_with_grads(x, w, a, b, bs, 2.0, dy, 0.0, 0)
    for gname, i in (("dx", 0), ("dA", 2), ("dB", 3), ("dbias", 4)):
        assert_close(grads[i], grads_ref[i], dtype, gname)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapters_over_half_precision_base(backend):
    dtype = torch.float16
    x, w, a, b, bs = _inputs((30,), 40, 24, 8, dtype, adapter_dtype=torch.float32)
    dy = torch.randn(30, 24).to(DEVICE, dtype)
    y, grads = _run(backend, x, w, a, b, bs, 2.0, 0.1, 5, dy)
    y_ref, grads_ref = reference_with_grads(x, w, a, b, bs, 2.0, dy, 0.1, 5)
    assert y.dtype == dtype and grads[2].dtype == torch.float32 and grads[3].dtype == torch.float32
    assert_close(y, y_ref, dtype, "y")
    for gname, i in (("dx", 0), ("dA", 2), ("dB", 3)):
        assert_close(grads[i], grads_ref[i], dtype, gname)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [(False, False, True, True, True), (True, False, False, False, False),
                                      (True, True, True, False, False), (False, False, False, True, False)],
                         ids=["adapters-only", "input-only", "weight-trained", "B-only"])
def test_only_needed_gradients(backend, requires):
    dtype = torch.float32
    x, w, a, b, bs = _inputs((17,), 27, 22, 5, dtype)
    dy = torch.randn(17, 22).to(DEVICE, dtype)
    _, grads = _run(backend, x, w, a, b, bs, 1.5, 0.3, 9, dy, requires=requires)
    _, grads_ref = reference_with_grads(x, w, a, b, bs, 1.5, dy, 0.3, 9)
    for name, req, got, ref in zip(("dx", "dW", "dA", "dB", "dbias"), requires, grads, grads_ref):
        if req:
            assert_close(got, ref, dtype, name)
        else:
            assert got is None, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, monkeypatch):
    """Output and partial buffers come from torch.empty: fill them with NaN and expect none to survive."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    dtype = torch.float32
    x, w, a, b, bs = _inputs((41,), 64, 80, 16, dtype)  # aligned: tensor-descriptor stores
    dy = torch.randn(41, 80).to(DEVICE, dtype)
    y, grads = _run(backend, x, w, a, b, bs, 1.0, 0.5, 3, dy)
    y_ref, grads_ref = reference_with_grads(x, w, a, b, bs, 1.0, dy, 0.5, 3)
    assert_close(y, y_ref, dtype, "y")
    for gname, i in (("dx", 0), ("dA", 2), ("dB", 3), ("dbias", 4)):
        assert_close(grads[i], grads_ref[i], dtype, gname)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, w, a, b, bs = _inputs((0,), 12, 10, 4, torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    y = lora_linear(x, w, a, b, 1.0, bias=bs, backend=backend)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert x.grad.shape == (0, 12) and torch.equal(a.grad, torch.zeros_like(a))


def test_backends_agree_bit_for_bit_on_the_dropout_mask():
    """Every backend drops the same elements for the same seed (interchangeable mid-run), bit for bit: with
    x = 1, dY = I, B = I and s = 1, dS = I and dA = dSᵀ·dropout(x) is the kept mask times 1/(1-p) = 2,
    exact in any summation order, so dA must equal 2·dropout_keep_mask exactly."""
    from fastpeft.dropout import dropout_keep_mask

    m, k, p, seed = 29, 36, 0.5, 4242
    eye = torch.eye(m, device=DEVICE)
    x, w, a = torch.ones(m, k, device=DEVICE), torch.randn(m, k).to(DEVICE), torch.randn(m, k).to(DEVICE)
    expected = 2 * dropout_keep_mask(seed, m, k, p, device=DEVICE).float()
    assert 0 < int(expected.count_nonzero()) < m * k
    for be in BACKENDS:
        da = _run(be, x, w, a, eye, None, 1.0, p, seed, eye)[1][2]
        assert torch.equal(da, expected), f"{be}: mask differs at {(da != expected).nonzero()[:5].tolist()}"


def test_rank_beyond_triton_limit_is_explicit():
    x, w, a, b, _ = _inputs((3,), 8, 8, 257, torch.float32)
    with pytest.raises(fastpeft.BackendUnavailableError, match="r=257"):
        lora_linear(x, w, a, b, 1.0, backend="triton")
    y = lora_linear(x, w, a, b, 1.0, backend="auto")  # auto may choose the torch backend for it
    assert_close(y, reference_with_grads(x, w, a, b, None, 1.0, torch.ones(3, 8).to(DEVICE))[0], torch.float32, "y")


# ------------------------------------------------------------------------------------ layouts
# Every layout of every argument: tests/test_layouts.py (the one property test for every op).


def test_tensor_descriptors_only_for_rows_that_do_not_overlap():
    """A tensor descriptor addresses row i at base + i·stride: rows 0 apart (expanded) or closer than their
    length (overlapping) cannot be described, so those tensors take the pointer path, whatever their alignment."""
    from fastpeft.kernels.common import path_for

    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("no tensor-descriptor path on this GPU")
    base = torch.randn(4096, device=DEVICE)
    assert path_for(base.device, base[:40 * 8].view(8, 40)) == "tma"  # aligned, disjoint rows: the control
    assert path_for(base.device, base[:40].expand(8, 40)) == "ptr"  # stride (0, 1)
    assert path_for(base.device, base.as_strided((8, 40), (4, 1))) == "ptr"  # rows 16 bytes apart, 160 long
    assert path_for(base.device, base[:40].view(1, 40).as_strided((1, 40), (0, 1))) == "ptr"


# ------------------------------------------------------------------------- outputs users modify in place


def _inplace_case(backend, lead, op, module):
    dtype = torch.float32
    x, w, a, b, bs = _inputs(lead, 40, 24, 3, dtype, seed=8)
    t = torch.randn(*lead, 24, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    dy = torch.randn(*lead, 24, generator=torch.Generator().manual_seed(10)).to(DEVICE, dtype)
    if module:  # no dropout in the module: its seed is drawn inside, and the reference needs it
        layer = fastpeft.LoRALinear(torch.nn.Linear(40, 24), r=3, alpha=6, backend=backend).to(DEVICE)
        with torch.no_grad():
            for param, value in ((layer.base_layer.weight, w), (layer.base_layer.bias, bs), (layer.lora_A, a),
                                 (layer.lora_B, b)):
                param.copy_(value)
        layer.base_layer.bias.requires_grad_(True)  # so dbias is checked too
        params = (layer.lora_A, layer.lora_B, layer.base_layer.bias)
        xl = x.clone().requires_grad_(True)
        scaling, p, seed = layer.scaling, 0.0, 0
        y = layer(xl)
    else:
        xl, al, bl, bsl = (v.clone().requires_grad_(True) for v in (x, a, b, bs))
        params = (al, bl, bsl)
        scaling, p, seed = 2.0, 0.25, 99
        y = lora_linear(xl, w, al, bl, scaling, bias=bsl, dropout_p=p, seed=seed, backend=backend)
    if op == "relu_":
        y.relu_()
    else:
        y += t
    y.backward(dy)
    # float64 reference of the same composition
    leaves = [v.detach().double().requires_grad_(True) for v in (x, a, b, bs)]
    x64, a64, b64, bs64 = leaves
    rows = x64.reshape(-1, 40)
    xd = rows * fastpeft.dropout.dropout_keep_mask(seed, rows.shape[0], 40, p) / (1 - p) if p > 0 else rows
    y64 = (rows @ w.double().t() + scaling * (xd @ a64.t()) @ b64.t() + bs64).reshape(*lead, 24)
    y64 = y64.relu() if op == "relu_" else y64 + t.double()
    y64.backward(dy.double())
    assert_close(y, y64, dtype, f"{op}: y")
    for name, got, ref in zip(("dx", "dA", "dB", "dbias"), (xl, *params), leaves):
        assert_close(got.grad, ref.grad, dtype, f"{op}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["relu_", "+="])
@pytest.mark.parametrize("lead", [(7,), (2, 3)], ids=["2-D", "3-D"])
@pytest.mark.parametrize("module", [False, True], ids=["lora_linear", "LoRALinear"])
def test_in_place_op_on_output_in_training(backend, op, lead, module):
    """The output is not a view created inside the autograd Function: relu_() and += after it train exactly."""
    _inplace_case(backend, lead, op, module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_op_on_inference_output(backend):
    """The inference path (nothing requires grad) returns a tensor that may be modified in place too."""
    x, w, a, b, bs = _inputs((2, 3), 40, 24, 3, torch.float32)
    ref = reference_with_grads(x, w, a, b, bs, 2.0, torch.ones(2, 3, 24).to(DEVICE))[0]
    with torch.no_grad():
        y = lora_linear(x, w, a, b, 2.0, bias=bs, backend=backend)
        y.relu_()
    assert_close(y, ref.relu(), torch.float32, "no_grad, relu_")
    y = lora_linear(x, w, a, b, 2.0, bias=bs, backend=backend)  # grad mode on, nothing requires grad
    y += 1
    assert_close(y, ref + 1, torch.float32, "grad mode, +=")


# ------------------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_double_backward_matches_float64(backend, p):
    """create_graph=True, then the gradient of a function of the gradients: the second derivatives w.r.t.
    x, A, B and bias are exact (the backward is recomputed in differentiable torch ops)."""
    dtype = torch.float32
    x, w, a, b, bs = _inputs((2, 5), 24, 13, 3, dtype, seed=12)
    g = torch.Generator().manual_seed(13)
    dy = torch.randn(2, 5, 13, generator=g).to(DEVICE)
    cot = [torch.randn(*t.shape, generator=g).to(DEVICE) for t in (x, a, b, bs)]

    def second(leaves, fn):
        y = fn(*leaves)
        grads = torch.autograd.grad((y * dy.to(y.dtype)).square().sum(), leaves, create_graph=True)
        sum(((gr * c.to(gr.dtype)).sum() for gr, c in zip(grads, cot))).backward()
        return y, grads, [t.grad for t in leaves]

    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bs)]
    y, g1, g2 = second(leaves, lambda x_, a_, b_, bs_: lora_linear(x_, w, a_, b_, 1.5, bias=bs_, dropout_p=p,
                                                                     seed=5, backend=backend))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, a, b, bs)]

    def ref(x_, a_, b_, bs_):
        rows = x_.reshape(-1, 24)
        xd = rows * fastpeft.dropout.dropout_keep_mask(5, 10, 24, p) / (1 - p) if p > 0 else rows
        return (rows @ w.double().t() + 1.5 * (xd @ a_.t()) @ b_.t() + bs_).reshape(2, 5, 13)

    y64, g164, g264 = second(leaves64, ref)
    assert_close(y, y64, dtype, "y")
    for name, got, exp in zip(("x", "A", "B", "bias"), g1, g164):
        assert_close(got, exp, dtype, f"first derivative d{name}")
    for name, got, exp in zip(("x", "A", "B", "bias"), g2, g264):
        assert got is not None, f"second derivative w.r.t. {name} missing"
        assert_close(got, exp, dtype, f"second derivative w.r.t. {name}")


def test_ordinary_backward_stays_on_the_backend(monkeypatch):
    """Only create_graph=True takes the differentiable (torch-op) backward; plain and checkpointed backward
    keep the backend's own kernels."""
    from fastpeft.ops import lora_linear as op

    def refuse(*args, **kwargs):
        raise AssertionError("the differentiable backward ran without create_graph")

    monkeypatch.setattr(op, "_differentiable_backward", refuse)
    layer = fastpeft.LoRALinear(torch.nn.Linear(21, 33), r=4, alpha=8, backend="torch").to(DEVICE)
    x = torch.randn(2, 5, 21, device=DEVICE, requires_grad=True)
    layer(x).sum().backward()
    for reentrant in (True, False):
        torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=reentrant).sum().backward()


# ---------------------------------------------------------------------------------------- empty widths


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_out_features(backend):
    x, _, a, _, _ = _inputs((7,), 40, 24, 3, torch.float32)
    w, b, bs = torch.randn(0, 40).to(DEVICE), torch.randn(0, 3).to(DEVICE), torch.randn(0).to(DEVICE)
    xl, al, bl, bsl = (t.clone().requires_grad_(True) for t in (x, a, b, bs))
    y = lora_linear(xl, w, al, bl, 2.0, bias=bsl, dropout_p=0.2, seed=3, backend=backend)
    assert y.shape == (7, 0)
    y.sum().backward()
    assert torch.equal(xl.grad, torch.zeros_like(x)) and torch.equal(al.grad, torch.zeros_like(a))
    assert bl.grad.shape == (0, 3) and bsl.grad.shape == (0,)
