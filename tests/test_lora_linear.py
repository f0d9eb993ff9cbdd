"""fastpeft.lora_linear against a float64 reference: forward and every gradient, both backends.

On CPU the Triton kernels run under the interpreter (tests/conftest.py); bf16 Triton runs on CUDA only,
because the interpreter computes bf16 dots wrongly. Shapes are small and odd so that every kernel meets
partial tiles; (40, 64, 96, 16)-like shapes are 16-byte aligned and take the tensor-descriptor path.
"""
import math
import os

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import fastpeft
from fastpeft import lora_linear
from reference_lora import reference_with_grads
from tolerances import assert_close, tol

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
    """The torch and Triton backends drop the same elements for the same seed (interchangeable mid-run)."""
    dtype = torch.float32
    x, w, a, b, bs = _inputs((29,), 36, 20, 4, dtype)
    dy = torch.randn(29, 20).to(DEVICE, dtype)
    outs = {be: _run(be, x, w, a, b, bs, 1.0, 0.4, 4242, dy) for be in BACKENDS}
    for be in BACKENDS[1:]:
        torch.testing.assert_close(outs[be][1][2], outs["torch"][1][2], rtol=1e-4, atol=1e-5, msg=be)


def test_rank_beyond_triton_limit_is_explicit():
    x, w, a, b, _ = _inputs((3,), 8, 8, 257, torch.float32)
    with pytest.raises(fastpeft.BackendUnavailableError, match="r=257"):
        lora_linear(x, w, a, b, 1.0, backend="triton")
    y = lora_linear(x, w, a, b, 1.0, backend="auto")  # auto may choose the torch backend for it
    assert_close(y, reference_with_grads(x, w, a, b, None, 1.0, torch.ones(3, 8).to(DEVICE))[0], torch.float32, "y")


# ------------------------------------------------------------------------------------ layouts (property test)
# Every tensor argument is a differentiable view of a contiguous leaf with the layout drawn; the float64
# reference applies the same view to the same values. Gradients are compared where the op returns them: for
# the argument itself (retain_grad), before autograd folds them into the leaf in the argument's dtype.
MATRIX_LAYOUTS = ["contiguous", "transposed", "cols[::2]", "rows[::2]", "offset-view", "expanded-rows",
                  "expanded-cols", "overlapping-rows"]
VECTOR_LAYOUTS = ["contiguous", "[::2]", "expanded", "offset-view"]


def _matrix_layout(kind, r, c):
    """(leaf shape, view of the leaf with shape [r, c] and the layout `kind`)."""
    if kind == "contiguous":
        return (r, c), lambda t: t
    if kind == "transposed":
        return (c, r), lambda t: t.t()
    if kind == "cols[::2]":
        return (r, 2 * c), lambda t: t[:, ::2]
    if kind == "rows[::2]":
        return (2 * r, c), lambda t: t[::2]
    if kind == "offset-view":  # a view into a larger tensor, base not 16-byte aligned
        return (r + 1, c + 3), lambda t: t[1:, 3:]
    if kind == "expanded-rows":  # stride 0 between rows
        return (1, c), lambda t: t.expand(r, c)
    if kind == "expanded-cols":
        return (r, 1), lambda t: t.expand(r, c)
    if kind == "overlapping-rows":  # rows 4 elements apart (16-byte aligned in fp32) but c long: they overlap
        return ((r - 1) * 4 + c,), lambda t: t.as_strided((r, c), (4, 1))
    raise AssertionError(kind)


def _vector_layout(kind, n):
    if kind == "contiguous":
        return (n,), lambda t: t
    if kind == "[::2]":
        return (2 * n,), lambda t: t[::2]
    if kind == "expanded":
        return (1,), lambda t: t.expand(n)
    if kind == "offset-view":
        return (n + 1,), lambda t: t[1:]
    raise AssertionError(kind)


def _x_layout(kind, lead, k):
    """x [*lead, k]: the matrix layouts on 2-D x, plus 1-D x and 3-D x whose leading dims cannot be merged."""
    if kind == "1-D":
        return (k,), lambda t: t
    if kind == "3-D permuted":  # [b, s, k] from a [s, k, b] tensor: reshape(-1, k) must copy
        b, s = lead
        return (s, k, b), lambda t: t.permute(2, 0, 1)
    if kind == "3-D batch-expanded":  # stride 0 along the batch
        b, s = lead
        return (1, s, k), lambda t: t.expand(b, s, k)
    if kind == "3-D contiguous":
        return (*lead, k), lambda t: t
    m = 1
    for d in lead:
        m *= d
    shape, fn = _matrix_layout(kind, m, k)
    return shape, (lambda t: fn(t).view(*lead, k)) if len(lead) != 1 else fn


X_LAYOUTS = MATRIX_LAYOUTS + ["1-D", "3-D permuted", "3-D batch-expanded", "3-D contiguous"]
# activations' dtype, then the adapters' (bf16 only where the kernels are compiled: the interpreter's bf16 is wrong)
LAYOUT_DTYPES = ["fp32", "fp16", "fp16+fp32-adapters"] + (["bf16", "bf16+fp32-adapters"] if DEVICE == "cuda" else [])


@st.composite
def _layout_cases(draw):
    x_kind = draw(st.sampled_from(X_LAYOUTS))
    if x_kind == "1-D":
        lead = ()
    elif x_kind.startswith("3-D"):
        lead = (draw(st.integers(1, 3)), draw(st.integers(1, 5)))
    elif x_kind == "overlapping-rows":
        lead = (draw(st.integers(1, 9)),)
    else:
        lead = (draw(st.sampled_from([1, 2, 7, 19])),)
    return dict(
        lead=lead, k=draw(st.sampled_from([5, 24, 40])), n=draw(st.sampled_from([1, 3, 24, 33])),
        r=draw(st.sampled_from([1, 3, 17])), x=x_kind, w=draw(st.sampled_from(MATRIX_LAYOUTS)),
        a=draw(st.sampled_from(MATRIX_LAYOUTS)), b=draw(st.sampled_from(MATRIX_LAYOUTS)),
        bias=draw(st.sampled_from(VECTOR_LAYOUTS + ["none"])), dy=draw(st.sampled_from(MATRIX_LAYOUTS + ["sum"])),
        dtype=draw(st.sampled_from(LAYOUT_DTYPES)), p=draw(st.sampled_from([0.0, 0.3])),
        train_w=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 2)),
    )


def _reference(views64, dy64, lead, k, p, seed):
    """Float64 y and the gradient for each argument (retained on the views), written from the math."""
    x64 = views64["x"]
    xd = x64
    if p > 0:
        keep = fastpeft.dropout.dropout_keep_mask(seed, math.prod(lead), k, p).reshape(x64.shape)
        xd = x64 * keep / (1 - p)
    y64 = x64 @ views64["w"].t() + 1.5 * (xd @ views64["a"].t()) @ views64["b"].t()
    if "bias" in views64:
        y64 = y64 + views64["bias"]
    y64.backward(dy64)
    return y64.detach(), {name: v.grad for name, v in views64.items() if v.requires_grad}


def _assert_close_bounded(got, exp, bound, dtype, what):
    """assert_close's test, with each element's rtol applied to the magnitude of its terms (the reference run
    on absolute values) rather than to its value: a result whose terms cancel (one output element, say) is
    held to the rounding of those terms, the forward-error bound of a sum."""
    atol_rel, rtol = tol(dtype)
    assert got.shape == exp.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    got = got.detach().to(torch.float64).cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = exp.pow(2).mean().sqrt().item() if exp.numel() else 0.0
    excess = (got - exp).abs() - (atol_rel * scale + rtol * bound)
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"{what} ({dtype}): element {worst} is {got.flatten()[worst].item():.6g}, expected "
        f"{exp.flatten()[worst].item():.6g} (terms of magnitude {bound.flatten()[worst].item():.3g})")


def _check_layout_case(backend, case):
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case["dtype"][:4]]
    adapter_dtype = torch.float32 if case["dtype"].endswith("fp32-adapters") else dtype
    lead, k, n, r = case["lead"], case["k"], case["n"], case["r"]
    g = torch.Generator().manual_seed(case["seed"])
    specs = {"x": (_x_layout(case["x"], lead, k), dtype, 1.0),
             "w": (_matrix_layout(case["w"], n, k), dtype, k ** -0.5),
             "a": (_matrix_layout(case["a"], r, k), adapter_dtype, k ** -0.5),
             "b": (_matrix_layout(case["b"], n, r), adapter_dtype, r ** -0.5)}  # B non-zero: the low-rank term counts
    if case["bias"] != "none":
        specs["bias"] = (_vector_layout(case["bias"], n), dtype, 1.0)
    leaves, views, views64, views_abs = {}, {}, {}, {}
    for name, ((shape, fn), dt, scale) in specs.items():
        base = (torch.randn(*shape, generator=g) * scale).to(dt)
        needs = name != "w" or case["train_w"]
        leaves[name] = base.to(DEVICE).clone().requires_grad_(needs)
        views[name] = fn(leaves[name])
        views64[name] = fn(base.double().requires_grad_(needs))
        views_abs[name] = fn(base.double().abs().requires_grad_(needs))
        for v in (views[name], views64[name], views_abs[name]):
            if needs:  # the gradient the op returns for the argument itself (autograd then folds it into the leaf)
                v.retain_grad()
    m = math.prod(lead)
    if case["dy"] == "sum":
        dy = torch.ones(()).to(DEVICE, dtype).expand(*lead, n)  # what y.sum().backward() passes: stride 0
    else:
        dshape, dfn = _matrix_layout(case["dy"], m, n)
        dy = dfn((torch.randn(*dshape, generator=g)).to(DEVICE, dtype)).reshape(*lead, n)
    p, seed = case["p"], 4321
    y = lora_linear(views["x"], views["w"], views["a"], views["b"], 1.5, bias=views.get("bias"), dropout_p=p,
                    seed=seed, backend=backend)
    y64, grads64 = _reference(views64, dy.double().cpu(), lead, k, p, seed)
    y_abs, grads_abs = _reference(views_abs, dy.double().cpu().abs(), lead, k, p, seed)
    assert y.dtype == dtype and (y.dim() != 2 or not y._is_view())
    _assert_close_bounded(y, y64, y_abs, dtype, f"{case} y")
    if case["dy"] == "sum":
        y.sum().backward()
    else:
        y.backward(dy)
    for name, leaf in leaves.items():
        if leaf.requires_grad:
            assert leaf.grad is not None and views[name].grad.dtype == leaf.dtype, name
            _assert_close_bounded(views[name].grad, grads64[name], grads_abs[name], dtype, f"{case} d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
# 30 fixed draws in CI; FASTPEFT_LAYOUT_EXAMPLES=400 for a deeper search (about 6 minutes on 2 CPU cores)
@settings(max_examples=int(os.environ.get("FASTPEFT_LAYOUT_EXAMPLES", 30)), deadline=None, derandomize=True,
          database=None)
@given(case=_layout_cases())
# the layouts that were silently wrong in the Triton GEMM before it honoured the bias stride
@example(case=dict(lead=(7,), k=40, n=24, r=3, x="contiguous", w="contiguous", a="contiguous", b="contiguous",
                   bias="[::2]", dy="contiguous", dtype="fp32", p=0.0, train_w=False, seed=1))
@example(case=dict(lead=(7,), k=40, n=24, r=3, x="contiguous", w="contiguous", a="contiguous", b="contiguous",
                   bias="expanded", dy="sum", dtype="fp32", p=0.0, train_w=False, seed=2))
@example(case=dict(lead=(1,), k=40, n=33, r=17, x="overlapping-rows", w="overlapping-rows", a="expanded-rows",
                   b="transposed", bias="offset-view", dy="expanded-rows", dtype="fp16+fp32-adapters", p=0.3,
                   train_w=True, seed=3))
def test_every_argument_layout_matches_float64(backend, case):
    _check_layout_case(backend, case)


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
