"""fastpeft.bottleneck_adapter and BottleneckAdapter against a float64 reference written from the math.

Triton kernels run under the interpreter on CPU; the PyTorch backend everywhere. bf16 Triton runs on CUDA
only (the interpreter computes bf16 dots wrongly).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import fastpeft  # noqa: E402,F401
from fastpeft._backend import BackendUnavailableError  # noqa: E402
from fastpeft.modules.adapter import BottleneckAdapter  # noqa: E402
from fastpeft.ops.adapter import ACTIVATIONS, bottleneck_adapter  # noqa: E402
from tolerances import DTYPES, assert_close  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


def _skip_bf16_interpreter(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("the Triton interpreter computes bf16 dots wrongly; bf16 Triton is tested on CUDA")


def _act64(z, act):
    if act == "relu":
        return torch.clamp_min(z, 0)
    if act == "gelu":
        return 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))
    if act == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)))
    return z * torch.sigmoid(z)


def reference(h, wd, bd, wu, bu, scaling, act, residual=None, dy=None):
    """Float64 forward, and the gradients of <y, dy> w.r.t. (h, wd, bd, wu, bu, residual)."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (h, wd, bd, wu, bu, residual)]
    h64, wd64, bd64, wu64, bu64, r64 = leaves
    z = h64 @ wd64.t() + (0 if bd64 is None else bd64)
    u = _act64(z, act) @ wu64.t() + (0 if bu64 is None else bu64)
    y = (h64 if r64 is None else r64) + scaling * u
    grads = [None] * 6
    if dy is not None:
        y.backward(dy.detach().double())
        grads = [None if t is None else t.grad for t in leaves]
    return y.detach(), grads


def make(M, D, A, dtype, wdtype=None, bias=True, parallel=False, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(DEVICE)

    h = rnd(*lead, M, D)
    wd = rnd(A, D, scale=D ** -0.5, dt=wdtype)
    wu = rnd(D, A, scale=A ** -0.5, dt=wdtype)  # never zero: the up-projection's init would hide every term
    bd = rnd(A, scale=0.5, dt=wdtype) if bias else None
    bu = rnd(D, scale=0.5, dt=wdtype) if bias else None
    r = rnd(*lead, M, D) if parallel else None
    return h, wd, bd, wu, bu, r


def run_and_check(backend, dtype, act, h, wd, bd, wu, bu, r, scaling=0.7, check_grads=True):
    leaves = [t for t in (h, wd, bd, wu, bu, r) if t is not None]
    for t in leaves:
        t.requires_grad_(check_grads)
    y = bottleneck_adapter(h, wd, bd, wu, bu, scaling, act, residual=r, backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(y.device)
    y64, g64 = reference(h, wd, bd, wu, bu, scaling, act, r, dy if check_grads else None)
    assert y.dtype == h.dtype and y.shape == h.shape
    assert_close(y, y64, dtype, "y")
    if not check_grads:
        return
    grads = torch.autograd.grad(y, leaves, dy)
    names = [n for n, t in zip(("dh", "d_down_w", "d_down_b", "d_up_w", "d_up_b", "d_residual"), (h, wd, bd, wu, bu, r))
             if t is not None]
    ref = [g for g in g64 if g is not None]
    for name, g, e, t in zip(names, grads, ref, leaves):
        assert g.dtype == t.dtype, f"{name}: dtype {g.dtype} != parameter dtype {t.dtype}"
        assert_close(g, e, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["series", "parallel"])
def test_matches_float64(backend, dtype, act, kind):
    _skip_bf16_interpreter(backend, dtype)
    # odd D (not a multiple of the tile) and A, several row blocks with a tail
    run_and_check(backend, dtype, act, *make(37, 40, 7, dtype, parallel=kind == "parallel", lead=()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,D,A,lead", [(1, 48, 42, ()), (5, 32, 1, (3,)), (33, 64, 16, (2,)), (20, 17, 300, ())])
def test_shapes(backend, M, D, A, lead):
    if backend == "triton" and A > 256:
        with pytest.raises(BackendUnavailableError, match="bottleneck=300"):
            bottleneck_adapter(*make(M, D, A, torch.float32)[:5], 1.0, "gelu", backend="triton")
        return
    run_and_check(backend, torch.float32, "gelu", *make(M, D, A, torch.float32, lead=lead))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_fp32_weights_with_half_activations(backend):
    run_and_check(backend, torch.float16, "silu", *make(19, 24, 9, torch.float16, wdtype=torch.float32, bias=False))
    run_and_check(backend, torch.float16, "relu", *make(19, 24, 9, torch.float16, wdtype=torch.float32, parallel=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dtype = torch.float32
    h, wd, bd, wu, bu, r = make(21, 40, 6, dtype, parallel=True)
    h_t = h.t().contiguous().t()                    # column-major [M, D]
    r_s = torch.cat([r, r], dim=1)[:, ::2]          # strided columns
    wd_t = wd.t().contiguous().t()
    wu_t = wu.t().contiguous().t()
    assert not h_t.is_contiguous() and not r_s.is_contiguous() and not wd_t.is_contiguous()
    run_and_check(backend, dtype, "gelu_tanh", h_t, wd_t, bd, wu_t, bu, r_s)
    run_and_check(backend, dtype, "gelu", h_t, wd_t, bd, wu_t, bu, None)
    h3 = torch.randn(4, 6, 40 * 2)[:, :, :40].to(DEVICE)  # 3-D view whose rows merge
    run_and_check(backend, dtype, "relu", h3, wd, bd, wu, bu, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients_and_no_grad(backend):
    dtype = torch.float32
    h, wd, bd, wu, bu, _ = make(13, 24, 5, dtype)
    y64, g64 = reference(h, wd, bd, wu, bu, 1.5, "gelu", None, torch.ones(13, 24))
    with torch.no_grad():
        assert_close(bottleneck_adapter(h, wd, bd, wu, bu, 1.5, "gelu", backend=backend), y64, dtype, "y (no_grad)")
    wu.requires_grad_(True)  # only the up-projection trains
    y = bottleneck_adapter(h, wd, bd, wu, bu, 1.5, "gelu", backend=backend)
    (gwu,) = torch.autograd.grad(y, [wu], torch.ones_like(y))
    assert_close(gwu, g64[3], dtype, "d_up_w alone")
    wu.requires_grad_(False)
    h.requires_grad_(True)  # only the input
    y = bottleneck_adapter(h, wd, bd, wu, bu, 1.5, "gelu", backend=backend)
    (gh,) = torch.autograd.grad(y, [h], torch.ones_like(y))
    assert_close(gh, g64[0], dtype, "dh alone")


def test_triton_backward_is_deterministic():
    h, wd, bd, wu, bu, _ = make(70, 40, 12, torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, wd, bd, wu, bu)]
        y = bottleneck_adapter(*leaves, 0.5, "silu", backend="triton")
        runs.append(torch.autograd.grad(y, leaves, torch.ones_like(y)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_backends_agree_on_saved_state_and_module_is_identity_at_init():
    ad = BottleneckAdapter(40, 42, activation="gelu", scaling=2.0).to(DEVICE)
    h = torch.randn(3, 5, 40, device=DEVICE)
    for backend in BACKENDS:
        ad.backend = backend
        assert torch.equal(ad(h), h), "a fresh adapter must be the identity (up-projection starts at zero)"
        r = torch.randn_like(h)
        assert torch.equal(ad(h, residual=r), r)
    assert fastpeft_count(ad) == 42 * 40 + 42 + 40 * 42 + 40


def fastpeft_count(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_layer_norm_and_parallel(backend):
    torch.manual_seed(0)
    ad = BottleneckAdapter(24, 6, activation="gelu_tanh", scaling=0.5, layer_norm=True, backend=backend).to(DEVICE)
    with torch.no_grad():
        ad.up_weight.normal_(0, 0.3)
        ad.up_bias.normal_(0, 0.3)
        ad.down_bias.normal_(0, 0.3)
        ad.norm.weight.normal_(1, 0.2)
        ad.norm.bias.normal_(0, 0.2)
    h = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    y = ad(h)
    dy = torch.randn_like(y)
    params = [h] + list(ad.parameters())
    grads = torch.autograd.grad(y, params, dy)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    h64 = p64[0]
    named = dict(zip([n for n, _ in ad.named_parameters()], p64[1:]))
    x64 = F.layer_norm(h64, (24,), named["norm.weight"], named["norm.bias"], ad.norm.eps)
    z = x64 @ named["down_weight"].t() + named["down_bias"]
    y64 = h64 + 0.5 * (_act64(z, "gelu_tanh") @ named["up_weight"].t() + named["up_bias"])
    ref = torch.autograd.grad(y64, p64, dy.double())
    assert_close(y, y64, torch.float32, "y (layer norm)")
    for (n, _), g, e in zip([("h", None)] + list(ad.named_parameters()), grads, ref):
        assert_close(g, e, torch.float32, f"d{n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    h, wd, bd, wu, bu, r = make(4, 8, 3, torch.float32, parallel=True)
    cases = [
        ((h[:, :6], wd, bd, wu, bu), {}, ValueError, "h: expected last dimension 8"),
        ((h, wd[:0], bd[:0], wu[:, :0], bu), {}, ValueError, "bottleneck >= 1"),
        ((h, wd, bd, wu[:, :2], bu), {}, ValueError, r"up_w: expected shape \[8, 3\]"),
        ((h, wd, bd[:2], wu, bu), {}, ValueError, r"down_b: expected shape \[3\]"),
        ((h, wd, bd, wu, bu[:5]), {}, ValueError, r"up_b: expected shape \[8\]"),
        ((h, wd, bd, wu, bu), {"activation": "tanh"}, ValueError, "activation: expected one of"),
        ((h, wd, bd, wu, bu), {"scaling": float("nan")}, ValueError, "scaling: expected a finite"),
        ((h, wd, bd, wu, bu), {"scaling": "1"}, TypeError, "scaling: expected a real number"),
        ((h, wd, bd, wu, bu), {"residual": r[:2]}, ValueError, "residual: expected shape"),
        ((h, wd, bd, wu, bu), {"residual": r.half()}, TypeError, "residual: expected dtype"),
        ((h.half(), wd, bd, wu.half(), bu), {}, TypeError, "up_w: expected dtype torch.float32"),
        ((h.half(), wd.bfloat16(), bd, wu, bu), {}, TypeError, "down_w: expected dtype torch.float16"),
        ((h.long(), wd, bd, wu, bu), {}, TypeError, "h: expected dtype in"),
        ((h, wd[0], bd, wu, bu), {}, ValueError, "down_w: expected a 2-D tensor"),
        ((h.numpy(), wd, bd, wu, bu), {}, TypeError, "h: expected a torch.Tensor"),
    ]
    for args, kw, exc, msg in cases:
        kw = {"scaling": 1.0, "activation": "gelu", **kw}
        with pytest.raises(exc, match=msg):
            bottleneck_adapter(*args, kw.pop("scaling"), kw.pop("activation"), backend=backend, **kw)
    with pytest.raises(ValueError, match="backend"):
        bottleneck_adapter(h, wd, bd, wu, bu, 1.0, "gelu", backend="cudnn")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run"):  # other ops' backend
        bottleneck_adapter(h, wd, bd, wu, bu, 1.0, "gelu", backend="cuda")
    with pytest.raises(ValueError, match="bottleneck: expected an int >= 1, got 0"):
        BottleneckAdapter(8, 0)
    with pytest.raises(ValueError, match="activation"):
        BottleneckAdapter(8, 2, activation="swish")
    with pytest.raises(TypeError, match="d_model"):
        BottleneckAdapter(8.0, 2)


# --------------------------------------------------------------------------------------------------
# layouts, in-place edits of the output, double backward, degenerate sizes

# every layout a tensor argument may come in; `with_layout` builds each from contiguous values
LAYOUTS = ("strided", "narrow", "offset", "transposed", "expanded", "expanded_all")


def with_layout(t, kind):
    """A leaf-free tensor of t's shape and dtype at layout `kind`, with t's values, except the expanded
    layouts (stride 0), which repeat t's first row ("expanded") or first element ("expanded_all"): compare
    against a reference computed from the returned tensor. 1-D tensors have no "transposed"/"narrow" form:
    they get a column of a 2-D tensor (stride 3, offset 1)."""
    t = t.detach()
    if kind == "contiguous":
        return t.clone()
    if kind == "expanded":
        return t[:1].clone().expand(t.shape)
    if kind == "expanded_all":
        return t.reshape(-1)[:1].clone().expand(t.shape)
    if kind == "offset":  # contiguous, 5 elements into a larger storage (unaligned)
        big = torch.zeros(t.numel() + 5, dtype=t.dtype, device=t.device)
        big[5:] = t.reshape(-1)
        return big[5:].view(t.shape)
    if t.dim() == 1 and kind in ("narrow", "transposed"):
        big = torch.zeros(t.shape[0], 3, dtype=t.dtype, device=t.device)
        big[:, 1] = t
        return big[:, 1]
    if kind == "strided":  # every dim stepped by 2: a view into a larger tensor
        big = torch.zeros([2 * d for d in t.shape], dtype=t.dtype, device=t.device)
        idx = tuple(slice(0, 2 * d, 2) for d in t.shape)
        big[idx] = t
        return big[idx]
    if kind == "narrow":  # rows wider than the tensor, starting 2 columns in
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype, device=t.device)
        big[..., 2:2 + t.shape[-1]] = t
        return big[..., 2:2 + t.shape[-1]]
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise AssertionError(kind)


def _layout_args(kind, parallel, D, seed=0):
    h, wd, bd, wu, bu, r = make(7, D, 5, torch.float32, parallel=parallel, seed=seed)
    dy = torch.randn(7, D, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    return [None if t is None else with_layout(t, kind) for t in (h, wd, bd, wu, bu, r, dy)]


def check_with_dy(backend, dtype, act, h, wd, bd, wu, bu, r, dy, scaling=0.7, what=""):
    """Forward and every gradient against float64, with dY given (any layout)."""
    leaves = [t.requires_grad_(True) for t in (h, wd, bd, wu, bu, r) if t is not None]
    y = bottleneck_adapter(h, wd, bd, wu, bu, scaling, act, residual=r, backend=backend)
    y64, g64 = reference(h, wd, bd, wu, bu, scaling, act, r, dy)
    assert_close(y, y64, dtype, f"y {what}")
    grads = torch.autograd.grad(y, leaves, dy)
    for g, e, name in zip(grads, [g for g in g64 if g is not None], ("dh", "dwd", "dbd", "dwu", "dbu", "dr")):
        assert_close(g, e, dtype, f"{name} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_argument_at_every_layout(backend, kind):
    """issue 11: the Triton kernels read the bias vectors as if contiguous (a sliced bias gave wrong values,
    an expanded one read past its storage). Each layout for every argument and dY at once; D = 40 leaves a
    tile tail, D = 32 takes the unmasked (EVEN_D) loads."""
    for parallel, D, act in ((True, 40, "gelu"), (False, 32, "silu")):
        check_with_dy(backend, torch.float32, act, *_layout_args(kind, parallel, D), what=f"({kind}, D={D})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts_3d_input(backend):
    """A 3-D input whose leading dims cannot merge (copied by the op), fp16 activations with fp32 weights,
    each argument at a different layout."""
    h, wd, bd, wu, bu, r = make(6, 24, 5, torch.float16, wdtype=torch.float32, parallel=True, lead=(3,))
    h = h.transpose(0, 1).contiguous().transpose(0, 1)   # [3, 6, 24] whose rows do not merge into one stride
    r = with_layout(r, "strided")
    dy = with_layout(torch.randn(3, 6, 24).half().to(DEVICE), "expanded")
    check_with_dy(backend, torch.float16, "relu", h, with_layout(wd, "transposed"), with_layout(bd, "expanded"),
                  with_layout(wu, "narrow"), with_layout(bu, "strided"), r, dy, what="(mixed)")


def _relu_or_add(y, how, other):
    if how == "relu_":
        y.relu_()
    else:
        y += other
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["relu_", "iadd"])
def test_output_can_be_modified_in_place(backend, how):
    """issue 11: the output was a view made inside the autograd Function, so relu_() or += on it raised in
    backward. 3-D input (the case that reshapes), series and parallel, op and module."""
    other = torch.randn(2, 7, 24, device=DEVICE)
    for parallel in (False, True):
        h, wd, bd, wu, bu, r = make(7, 24, 5, torch.float32, parallel=parallel, lead=(2,))
        leaves = [t.requires_grad_(True) for t in (h, wd, bd, wu, bu, r) if t is not None]
        y = _relu_or_add(bottleneck_adapter(h, wd, bd, wu, bu, 0.7, "gelu", residual=r, backend=backend), how, other)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, dy)
        l64 = [t.detach().double().requires_grad_(True) for t in leaves]
        h64, wd64, bd64, wu64, bu64 = l64[:5]
        y64 = (l64[5] if parallel else h64) + 0.7 * (_act64(h64 @ wd64.t() + bd64, "gelu") @ wu64.t() + bu64)
        y64 = _relu_or_add(y64.clone(), how, other.double())
        for g, e in zip(grads, torch.autograd.grad(y64, l64, dy.double())):
            assert_close(g, e, torch.float32, f"gradient after {how}")
    ad = BottleneckAdapter(24, 5, backend=backend).to(DEVICE)
    with torch.no_grad():
        ad.up_weight.normal_()
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    _relu_or_add(ad(x), how, other).sum().backward()
    assert ad.up_weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_not_implemented(backend):
    h, wd, bd, wu, bu, _ = make(5, 16, 3, torch.float32)
    h.requires_grad_(True)
    wu.requires_grad_(True)
    y = bottleneck_adapter(h, wd, bd, wu, bu, 1.0, "gelu", backend=backend)
    with pytest.raises(NotImplementedError, match="bottleneck_adapter: double backward"):
        torch.autograd.grad((y * y).sum(), [h], create_graph=True)
    # first-order gradients are unaffected by the check
    torch.autograd.grad(bottleneck_adapter(h, wd, bd, wu, bu, 1.0, "gelu", backend=backend).sum(), [h, wu])


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes_raise_clearly(backend):
    with pytest.raises(ValueError, match=r"down_w: expected shape .* d_model >= 1, got \(2, 0\)"):
        bottleneck_adapter(torch.randn(3, 0), torch.randn(2, 0), None, torch.randn(0, 2), None, 1.0, backend=backend)
    with pytest.raises(ValueError, match="d_model: expected an int >= 1, got 0"):
        BottleneckAdapter(0, 4)
    # an empty batch is fine
    h, wd, bd, wu, bu, _ = make(0, 16, 3, torch.float32)
    h.requires_grad_(True)
    y = bottleneck_adapter(h, wd, bd, wu, bu, 1.0, "gelu", backend=backend)
    assert y.shape == (0, 16)
    (gh,) = torch.autograd.grad(y.sum(), [h])
    assert gh.shape == (0, 16)


# --------------------------------------------------------------------------------------------------
# static compile of every GPU configuration (no GPU needed)
#
# Every entry of the kernels' config tables, for sm_90 and sm_80, compiled with its heaviest variant
# (every optional feature on, the widest bottleneck of its bucket, runtime strides): no spills, tensor
# cores, shared memory within the architecture's limit. bf16 stands for both 16-bit dtypes (same layouts);
# fp32 (TF32 dots, half the D tile) where its tiles are the heaviest (`_fp32_compiled`); fp32 with "ieee"
# dots (torch's default fp32 precision: FMA, no tensor cores, its own "ieee" tiles) for every entry.
#
# The compiles run in worker processes started when the session begins (`_start_static_compiles`), so they
# overlap the interpreter tests; the static tests collect the reports at the end of each module.

ARCHS = (90, 80)
# bytes of shared memory a block may use: sm_90's opt-in maximum; for sm_80 compiles the 99 KB of sm_86/89,
# which run the same code
SMEM_LIMIT = {90: 232448, 80: 101376}
STATIC_TEST = "test_gpu_config_compiles_without_spills"


def _i32(*names):
    return {n: "i32" for n in names}


def _fp32_compiled(k, kernel, ba):
    """fp32 is compiled for the widest bucket, and wherever its D tile is not halved (already at the
    minimum), where its tiles hold twice the bytes of bf16's and so are the config's heaviest variant."""
    halved = k.gpu_config(kernel, ba, torch.float32, "tf32")["BLOCK_D"] < k.gpu_config(kernel, ba, torch.bfloat16)["BLOCK_D"]
    return ba == max(k.CONFIGS[kernel]) or not halved


def _static_cases():
    """(name, module, kernel, signature, constexprs, arch, num_warps, num_stages) for every shipped config."""
    from fastpeft.kernels import adapter as k

    cases = []
    for dt, dtype, precision in (("bf16", torch.bfloat16, "tf32"), ("fp32", torch.float32, "tf32"),
                                 ("fp32ieee", torch.float32, "ieee")):
        ty = dt[:4]  # the Triton type of the activations
        for ba in sorted(k.CONFIGS["fwd"], reverse=True):
            for kernel, fn, sig, ce in (
                ("fwd", "_adapter_kernel",
                 dict(X=f"*{ty}", R=f"*{ty}", Y=f"*{ty}", Z="*fp32", WD=f"*{ty}", BD=f"*{ty}", WU=f"*{ty}", BU=f"*{ty}",
                      **_i32("M", "D", "A"), scaling="fp32",
                      **_i32("stride_xm", "stride_xd", "stride_rm", "stride_rd", "stride_ym", "stride_yd",
                             "stride_wd_a", "stride_wd_d", "stride_wu_d", "stride_wu_a", "stride_bd", "stride_bu")),
                 dict(ACT=1, HAS_BD=True, HAS_BU=True, STORE_Z=True, EVEN_D=False)),
                ("dz", "_adapter_bwd_dz_kernel",
                 dict(DY=f"*{ty}", Z="*fp32", WU=f"*{ty}", DZ=f"*{ty}", ACTZ=f"*{ty}", PBD="*fp32",
                      **_i32("M", "D", "A"), scaling="fp32",
                      **_i32("stride_dym", "stride_dyd", "stride_wu_d", "stride_wu_a")),
                 dict(ACT=1, NEED_DW=True, EVEN_D=False)),
                ("bwd", "_adapter_bwd_kernel",
                 dict(DY=f"*{ty}", X=f"*{ty}", ACTZ=f"*{ty}", DZ=f"*{ty}", WD=f"*{ty}", DX=f"*{ty}",
                      PWU="*fp32", PWD="*fp32", PBU="*fp32", **_i32("M", "D", "A", "rows_per_split"),
                      **_i32("stride_dym", "stride_dyd", "stride_xm", "stride_xd", "stride_dxm", "stride_dxd",
                             "stride_wd_a", "stride_wd_d")),
                 dict(SKIP=True, NEED_DX=True, NEED_DW=True, EVEN_D=False)),
            ):
                cfg = k.gpu_config(kernel, ba, dtype, precision)
                if dt == "fp32" and not _fp32_compiled(k, kernel, ba):
                    continue
                ce = dict(ce, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], BLOCK_A=ba, INPUT_PRECISION=precision)
                if "A_CHUNK" in cfg:
                    ce["A_CHUNK"] = min(ba, cfg["A_CHUNK"])
                for arch in ARCHS:
                    cases.append((f"{kernel}-a{ba}-{dt}-sm{arch}", "fastpeft.kernels.adapter", fn, sig, ce, arch,
                                  cfg["num_warps"], cfg["num_stages"]))
    return cases


def compile_case(case):
    """Compile one case ahead of time: registers and stack (spills) from the cubin, shared memory, and the
    tensor-core instructions counted in the PTX (mma.sync becomes HMMA, wgmma.mma_async HGMMA), as
    tests/static_compile.py counts them."""
    import importlib
    import re
    import subprocess
    import tempfile
    import time

    import triton
    from static_compile import _nvidia_tool
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, module, fn, sig, ce, arch, nw, ns = case
    try:
        t0 = time.process_time()
        src = ASTSource(fn=getattr(importlib.import_module(module), fn), constexprs=dict(ce),
                        signature={**sig, **{n: "constexpr" for n in ce}})
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": nw, "num_stages": ns})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        ptx = kernel.asm["ptx"]
        rep = {"regs": int(re.search(r"REG:(\d+)", usage).group(1)),
               "stack": int(re.search(r"STACK:(\d+)", usage).group(1)), "shared": kernel.metadata.shared,
               "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)), "mma": len(re.findall(r"\bmma\.sync", ptx)),
               "cpu_s": round(time.process_time() - t0, 1)}
        rep["tensor_core"] = rep["wgmma"] + rep["mma"] > 0
        return name, rep, None
    except Exception as exc:  # reported per case by the test
        return name, None, f"{type(exc).__name__}: {str(exc)[:400]}"


_POOL = None
_FUTURES = {}  # case name -> Future of compile_case


def submit_compiles(cases):
    """Start compiling the cases not yet started, in worker processes shared by every module that imports
    this one. The workers import Triton without the interpreter (the test session set TRITON_INTERPRET=1,
    under which kernels are not compilable objects): they are spawned inside this call, with it unset."""
    global _POOL
    import atexit
    import multiprocessing

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        if _POOL is None:
            _POOL = ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1),
                                        mp_context=multiprocessing.get_context("spawn"))
            atexit.register(_POOL.shutdown, wait=True, cancel_futures=True)
        for case in cases:
            if case[0] not in _FUTURES:
                _FUTURES[case[0]] = _POOL.submit(compile_case, case)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def compile_reports(cases):
    """{name: (report, error)}, compiling whatever has not been started yet."""
    submit_compiles(cases)
    return {c[0]: _FUTURES[c[0]].result()[1:] for c in cases}


def start_selected_compiles(session):
    """Submit the static cases of every selected static test in the session (all modules), so that the
    compiles overlap the interpreter tests that run before them."""
    cases = []
    for item in session.items:
        if getattr(item, "originalname", None) == STATIC_TEST and hasattr(item.module, "_static_cases"):
            wanted = item.callspec.params["case"]
            cases += [c for c in item.module._static_cases() if c[0] == wanted]
    if cases:
        submit_compiles(cases)


@pytest.fixture(scope="module", autouse=True)
def _start_static_compiles(request):
    start_selected_compiles(request.session)


def check_report(name, rep, err):
    from static_compile import tensor_core_failure

    assert err is None, f"{name}: compile error {err}"
    arch = int(name.rsplit("sm", 1)[1])
    assert rep["stack"] == 0, f"{name}: {rep['stack']} bytes of stack (register spills), {rep['regs']} registers"
    assert rep["shared"] <= SMEM_LIMIT[arch], f"{name}: {rep['shared']} bytes of shared memory > {SMEM_LIMIT[arch]}"
    # fp32 dots at "tf32" compile to TF32 tensor-core instructions, at "ieee" to FMA ones (`expects_tensor_cores`)
    failure = tensor_core_failure(name, rep)
    assert failure is None, f"{failure} {rep}"


def test_static_cases_cover_every_config():
    from fastpeft.kernels import adapter as k

    names = [c[0] for c in _static_cases()]
    assert len(names) == len(set(names))
    for kernel, table in k.CONFIGS.items():
        for ba in table:
            for arch in ARCHS:
                assert f"{kernel}-a{ba}-bf16-sm{arch}" in names
                assert (f"{kernel}-a{ba}-fp32-sm{arch}" in names) == _fp32_compiled(k, kernel, ba)
            assert _fp32_compiled(k, kernel, max(table))
            for arch in ARCHS:
                assert f"{kernel}-a{ba}-fp32ieee-sm{arch}" in names
    assert "bwd-a64-fp32-sm80" in names  # its D tile is at the minimum, so fp32 is its heaviest variant
    # the launcher's buckets are exactly the tables' keys
    assert {k.bucket(a) for a in range(1, k.MAX_BOTTLENECK + 1)} == set(k.CONFIGS["fwd"]) == set(k.CONFIGS["bwd"])


@pytest.mark.parametrize("case", [c[0] for c in _static_cases()])
def test_gpu_config_compiles_without_spills(case):
    check_report(case, *compile_reports([c for c in _static_cases() if c[0] == case])[case])


if __name__ == "__main__":
    for name, (rep, err) in compile_reports(_static_cases()).items():
        print(f"{name:24s} {err or rep}", flush=True)
