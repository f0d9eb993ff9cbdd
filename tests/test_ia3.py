"""fastpeft.ia3_linear and IA3Linear against a float64 reference; Triton under the interpreter on CPU."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import fastpeft  # noqa: E402,F401
from fastpeft.modules.ia3 import IA3Linear  # noqa: E402
from fastpeft.ops.ia3 import ia3_linear  # noqa: E402
from tolerances import DTYPES, assert_close  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BACKENDS = ["torch", "triton"]


def make(M, K, N, mode, dtype, ldtype=None, bias=True, zeros=(), seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, M, K, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(DEVICE)
    b = (torch.randn(N, generator=g) * 0.5).to(dtype).to(DEVICE) if bias else None
    l = (torch.rand(N if mode == "output" else K, generator=g) + 0.5)  # never ones: a no-op scale hides bugs
    l[list(zeros)] = 0.0
    return x, w, b, l.to(ldtype or dtype).to(DEVICE)


def reference(x, w, b, l, mode, dy):
    x64, l64 = x.detach().double().requires_grad_(True), l.detach().double().requires_grad_(True)
    w64 = w.double()
    b64 = None if b is None else b.double()
    y = F.linear(x64, w64, b64) * l64 if mode == "output" else F.linear(x64 * l64, w64, b64)
    gx, gl = torch.autograd.grad(y, [x64, l64], dy.double())
    return y.detach(), gx, gl


def check(backend, dtype, mode, x, w, b, l):
    x.requires_grad_(True)
    l.requires_grad_(True)
    y = ia3_linear(x, w, b, l, mode, backend=backend)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(y.device)
    y64, gx64, gl64 = reference(x, w, b, l, mode, dy)
    gx, gl = torch.autograd.grad(y, [x, l], dy)
    assert y.dtype == x.dtype and gl.dtype == l.dtype
    assert_close(y, y64, dtype, "y")
    assert_close(gx, gx64, dtype, "dx")
    assert_close(gl, gl64, dtype, "d_scale")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["output", "input"])
def test_matches_float64(backend, dtype, mode):
    if backend == "triton" and dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("the Triton interpreter computes bf16 dots wrongly; bf16 Triton is tested on CUDA")
    check(backend, dtype, mode, *make(37, 40, 23, mode, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["output", "input"])
def test_shapes_fp32_scale_zeros_and_strides(backend, mode):
    check(backend, torch.float32, mode, *make(1, 48, 17, mode, torch.float32, lead=(1,)))
    check(backend, torch.float16, mode, *make(20, 33, 32, mode, torch.float16, ldtype=torch.float32, bias=False))
    # exact zeros in the vector: the output-mode gradient must still be exact (recomputed columns)
    check(backend, torch.float32, mode, *make(19, 24, 21, mode, torch.float32, zeros=(0, 5, 20)))
    x, w, b, l = make(18, 40, 24, mode, torch.float32)
    check(backend, torch.float32, mode, x.t().contiguous().t(), w.t().contiguous().t(), b, l)


@pytest.mark.parametrize("mode", ["output", "input"])
def test_tensor_descriptor_path(mode):
    """16-byte aligned rows take the "tma" path (tensor descriptors, zero fill past the edges): the other
    tests' shapes take the pointer path."""
    from fastpeft.kernels.lora_linear import path_for

    for dtype in (torch.float32, torch.float16):
        x, w, b, l = make(37, 48, 40, mode, dtype)  # 96..192-byte rows; M, N, K not multiples of the tile
        if not ON_CUDA or torch.cuda.get_device_capability()[0] >= 9:
            assert path_for(x.device, x, w, torch.empty(37, 40, dtype=dtype, device=DEVICE)) == "tma"
        check("triton", dtype, mode, x, w, b, l)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["output", "input"])
def test_partial_gradients(backend, mode):
    x, w, b, l = make(21, 32, 24, mode, torch.float32)
    dy = torch.randn(21, 24, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _, gx64, gl64 = reference(x, w, b, l, mode, dy)
    l.requires_grad_(True)  # the vector alone: no dX to write
    (gl,) = torch.autograd.grad(ia3_linear(x, w, b, l, mode, backend=backend), [l], dy)
    assert_close(gl, gl64, torch.float32, "d_scale alone")
    l.requires_grad_(False)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(ia3_linear(x, w, b, l, mode, backend=backend), [x], dy)
    assert_close(gx, gx64, torch.float32, "dx alone")


def test_module_init_merge_unmerge_and_frozen_linear():
    torch.manual_seed(0)
    for mode in ("output", "input"):
        lin = torch.nn.Linear(24, 16).to(DEVICE)
        layer = IA3Linear(lin, scale=mode)
        x = torch.randn(5, 24, device=DEVICE)
        assert not lin.weight.requires_grad and not lin.bias.requires_grad
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["ia3_scale"]
        assert_close(layer(x), lin(x).double(), torch.float32, "identity at init")
        with torch.no_grad():
            layer.ia3_scale.uniform_(0.5, 1.5)
        before = layer(x)
        w0 = lin.weight.detach().clone()
        layer.merge()
        assert layer.merged
        assert_close(layer(x), before.double(), torch.float32, f"merged ({mode})")
        layer.unmerge()
        assert_close(lin.weight, w0.double(), torch.float32, "unmerged weight")
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    x, w, b, l = make(4, 8, 6, "output", torch.float32)
    cases = [
        ((x[:, :5], w, b, l, "output"), ValueError, "x: expected last dimension 8"),
        ((x, w, b, l[:3], "output"), ValueError, r"scale: expected shape \[6\]"),
        ((x, w, b, l, "input"), ValueError, r"scale: expected shape \[8\]"),
        ((x, w, b, l, "both"), ValueError, "mode: expected one of"),
        ((x, w, b[:2], l, "output"), ValueError, r"bias: expected shape \[6\]"),
        ((x.half(), w, b, l, "output"), TypeError, "weight: expected dtype torch.float16"),
        ((x, w, b, l.double(), "output"), TypeError, "scale: expected dtype"),
        ((x, w, b, l[None], "output"), ValueError, "scale: expected a 1-D tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ia3_linear(*args, backend=backend)
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        IA3Linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="scale: expected one of"):
        IA3Linear(torch.nn.Linear(2, 2), scale="k")


# --------------------------------------------------------------------------------------------------
# layouts, exact scale gradients, in-place edits of the output, merge memory and checks, degenerate sizes

from alloc_recorder import AllocRecorder, SavedRecorder  # noqa: E402
from test_adapter import LAYOUTS, with_layout  # noqa: E402


def check_given(backend, dtype, mode, x, w, b, l, dy, what=""):
    """Forward and the gradients of x and l against float64, with dY given (any layout)."""
    x.requires_grad_(True)
    l.requires_grad_(True)
    y = ia3_linear(x, w, b, l, mode, backend=backend)
    y64, gx64, gl64 = reference(x, w, b, l, mode, dy)
    gx, gl = torch.autograd.grad(y, [x, l], dy)
    assert_close(y, y64, dtype, f"y {what}")
    assert_close(gx, gx64, dtype, f"dx {what}")
    assert_close(gl, gl64, dtype, f"d_scale {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_argument_at_every_layout(backend, kind):
    """issue 11: the Triton kernels read bias and scale as if contiguous (sliced: wrong values, expanded:
    reads past the storage). Every argument and dY at the layout at once, both modes; K = 40 fp32 rows are
    16-byte aligned, so the tensor-descriptor path is taken where the layout allows it."""
    for mode in ("output", "input"):
        x, w, b, l = make(7, 40, 24, mode, torch.float32)
        dy = torch.randn(7, 24, generator=torch.Generator().manual_seed(4)).to(DEVICE)
        x, w, b, l, dy = (with_layout(t, kind) for t in (x, w, b, l, dy))
        check_given(backend, torch.float32, mode, x, w, b, l, dy, what=f"({kind}, {mode})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts_3d_fp16(backend):
    for mode in ("output", "input"):
        x, w, b, l = make(5, 24, 16, mode, torch.float16, ldtype=torch.float32, lead=(3,))
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # leading dims that do not merge
        dy = with_layout(torch.randn(3, 5, 16).half().to(DEVICE), "expanded")
        check_given(backend, torch.float16, mode, x, with_layout(w, "narrow"), with_layout(b, "expanded"),
                    with_layout(l, "strided"), dy, what=f"(mixed, {mode})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_scale_gradient_exact_for_tiny_zero_and_subnormal_entries(backend, dtype):
    """issue 11: output scaling recovered x·Wᵀ + b as y / l: an fp32 entry of 1e-8 under fp16 activations got a
    zero gradient (y underflows), a subnormal one NaN (1 / l overflows). The gradient must not depend on l."""
    x, w, b, l = make(19, 40, 24, "output", dtype, ldtype=torch.float32)
    l[[0, 3, 7, 11, 20]] = torch.tensor([1e-8, 0.0, 1e-40, -3e-39, 1e-30], device=DEVICE)
    dy = torch.randn(19, 24, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    check_given(backend, dtype, "output", x, w, b, l, dy, what="(tiny entries)")
    # the scale gradient does not read the output: nothing [M, out]-sized is saved besides x (and the frozen W)
    l = l.detach().requires_grad_(True)
    with SavedRecorder() as saved:
        y = ia3_linear(x.detach(), w, b, l, "output", backend=backend)
    saved.assert_none_shaped_like(y.shape, allow=[x, w], what="ia3_linear output scaling")


def _relu_or_add(y, how, other):
    if how == "relu_":
        y.relu_()
    else:
        y += other
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["relu_", "iadd"])
def test_output_can_be_modified_in_place(backend, how):
    """issue 11: the output was a view made inside the autograd Function (and, for output scaling, saved for
    backward), so relu_() or += on it raised in backward."""
    other = torch.randn(2, 7, 24, device=DEVICE)
    for mode in ("output", "input"):
        x, w, b, l = make(7, 40, 24, mode, torch.float32, lead=(2,))
        x.requires_grad_(True)
        l.requires_grad_(True)
        y = _relu_or_add(ia3_linear(x, w, b, l, mode, backend=backend), how, other)
        dy = torch.randn_like(y)
        gx, gl = torch.autograd.grad(y, [x, l], dy)
        x64, l64 = x.detach().double().requires_grad_(True), l.detach().double().requires_grad_(True)
        w64, b64 = w.double(), b.double()
        y64 = F.linear(x64, w64, b64) * l64 if mode == "output" else F.linear(x64 * l64, w64, b64)
        y64 = _relu_or_add(y64.clone(), how, other.double())
        gx64, gl64 = torch.autograd.grad(y64, [x64, l64], dy.double())
        assert_close(gx, gx64, torch.float32, f"dx after {how} ({mode})")
        assert_close(gl, gl64, torch.float32, f"d_scale after {how} ({mode})")
        layer = IA3Linear(torch.nn.Linear(40, 24), scale=mode, backend=backend).to(DEVICE)
        _relu_or_add(layer(x.detach()), how, other).sum().backward()
        assert layer.ia3_scale.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_not_implemented(backend):
    x, w, b, l = make(5, 16, 8, "output", torch.float32)
    x.requires_grad_(True)
    l.requires_grad_(True)
    y = ia3_linear(x, w, b, l, "output", backend=backend)
    with pytest.raises(NotImplementedError, match="ia3_linear: double backward"):
        torch.autograd.grad((y * y).sum(), [x], create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes_raise_clearly(backend):
    for w in (torch.randn(4, 0), torch.randn(0, 5)):
        x = torch.randn(3, w.shape[1])
        with pytest.raises(ValueError, match=r"weight: expected shape \[out_features, in_features\] with both >= 1"):
            ia3_linear(x, w, None, torch.ones(w.shape[0]), "output", backend=backend)
    for lin in (torch.nn.Linear(0, 4), torch.nn.Linear(4, 0)):
        with pytest.raises(ValueError, match="linear: expected in_features >= 1 and out_features >= 1"):
            IA3Linear(lin)
    x, w, b, l = make(0, 16, 8, "input", torch.float32)  # an empty batch is fine
    x.requires_grad_(True)
    l.requires_grad_(True)
    y = ia3_linear(x, w, b, l, "input", backend=backend)
    gx, gl = torch.autograd.grad(y.sum(), [x, l])
    assert y.shape == (0, 8) and gx.shape == (0, 16) and torch.equal(gl, torch.zeros_like(gl))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["output", "input"])
def test_merge_unmerge_allocate_no_weight_sized_tensor(wdtype, mode):
    """issue 11: merge computed W·l as fp32 copies of W (two out·in tensors); chunked in place now. An fp32
    vector over a 16-bit W is rounded once."""
    out_f, in_f = 24, 40
    lin = torch.nn.Linear(in_f, out_f).to(wdtype).to(DEVICE)
    layer = IA3Linear(lin, scale=mode, dtype=torch.float32)
    with torch.no_grad():
        layer.ia3_scale.uniform_(0.5, 1.5)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    l = layer.ia3_scale.detach().double()
    with AllocRecorder() as rec:
        layer.merge()
    rec.assert_below(out_f * in_f, f"IA3Linear.merge ({mode}, {wdtype})")
    expect_w = w0.double() * (l[:, None] if mode == "output" else l[None, :])
    assert_close(lin.weight, expect_w, wdtype, "merged weight")
    assert_close(lin.bias, b0.double() * l if mode == "output" else b0.double(), wdtype, "merged bias")
    with AllocRecorder() as rec:
        layer.unmerge()
    rec.assert_below(out_f * in_f, f"IA3Linear.unmerge ({mode}, {wdtype})")
    assert_close(lin.weight, w0.double(), wdtype, "unmerged weight")
    assert_close(lin.bias, b0.double(), wdtype, "unmerged bias")


def test_merge_and_unmerge_refuse_bad_vectors_before_changing_the_weight():
    for mode in ("output", "input"):
        lin = torch.nn.Linear(8, 6).to(DEVICE)
        layer = IA3Linear(lin, scale=mode)
        w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
        with torch.no_grad():
            layer.ia3_scale[2] = float("inf")
        with pytest.raises(ValueError, match=r"ia3_scale: cannot merge: entry 2 is inf"):
            layer.merge()
        assert not layer.merged and torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)
        with torch.no_grad():
            layer.ia3_scale.fill_(1.5)
        layer.merge()
        with torch.no_grad():
            layer.ia3_scale[1] = 0.0
            layer.ia3_scale[4] = float("nan")
        w1 = lin.weight.detach().clone()
        with pytest.raises(ValueError, match=r"ia3_scale: cannot unmerge: entry 1 is 0.0"):
            layer.unmerge()
        assert layer.merged and torch.equal(lin.weight, w1)
    # a 16-bit weight that merging with a tiny entry flushed to zero cannot be unmerged: say so
    lin = torch.nn.Linear(8, 6).half().to(DEVICE)
    layer = IA3Linear(lin, scale="output", dtype=torch.float32)
    with torch.no_grad():
        layer.ia3_scale[3] = 1e-12
    layer.merge()
    w1 = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="ia3_scale: cannot unmerge: merging flushed"):
        layer.unmerge()
    assert torch.equal(lin.weight, w1)


# --------------------------------------------------------------------------------------------------
# static compile of every GPU configuration (no GPU needed; machinery in test_adapter.py)
#
# Every entry of the GEMM config tables ("tma" for sm_90, "ptr" for sm_80 and sm_90), with runtime strides,
# each compiled with the heaviest variant that can select it: no spills, tensor cores, shared memory within
# the limit. The sizes other than "large" serve every variant; they are compiled with every feature on
# (bias, the input-scaling prologue, the output-scaling epilogue and the dl reduction) and B read as W's
# rows ([K, N], the backward's layout), and once more as the output-scaling dl recompute (bias, reduction,
# B = Wᵀ, no C). "large" serves only the variants without prologue or reduction; it is compiled as the
# forward: bias, epilogue, B = Wᵀ.
# bf16 stands for both 16-bit dtypes; fp32 (TF32, half the K tile) is compiled for the largest tile, and
# fp32 with "ieee" dots (torch's default fp32 precision: FMA, no tensor cores) at every size, as bf16 is.

from test_adapter import _start_static_compiles, check_report, compile_reports  # noqa: E402,F401 (a fixture)

STATIC_ARCHS = {"tma": (90,), "ptr": (90, 80)}


def _gemm_cases(k, path, size, dt, variant="", precision="tf32", cand=None):
    """variant "": the heaviest variant of the size (see above); "dl": the output-scaling scale gradient,
    Σ dY ⊙ (x·Wᵀ + b) with B read as Wᵀ and no C (the fused sizes only). cand: a measured candidate other than
    the default (GEMM_CANDIDATES), named gemm-<path>-<size>@<cand>-..."""
    entry = k.GEMM_CONFIGS[path][size] if cand is None else k.GEMM_CANDIDATES[path][size][cand]
    cfg = k.tiles_for(entry, {"bf16": torch.bfloat16, "fp32": torch.float32}[dt], precision)
    sig = {"A": f"*{dt}", "B": f"*{dt}", "C": f"*{dt}", "BIAS": f"*{dt}", "PRO": "*fp32", "EPI": "*fp32",
           "E": f"*{dt}", "P": "*fp32", **{n: "i32" for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk",
                                                              "stride_bn", "stride_cm", "stride_cn", "stride_em",
                                                              "stride_en", "stride_bias", "stride_pro")}}
    fused = size != "large"
    if variant == "dl":
        flags = dict(HAS_BIAS=True, HAS_PRO=False, HAS_EPI=False, HAS_RED=True, STORE_C=False, B_KN=False)
    else:
        flags = dict(HAS_BIAS=True, HAS_PRO=fused, HAS_EPI=True, HAS_RED=fused, STORE_C=True, B_KN=fused)
    ce = dict(flags, EVEN_K=False, USE_TMA=path == "tma", INPUT_PRECISION=precision,
              **{n: v for n, v in cfg.items() if n.startswith(("BLOCK_", "GROUP_"))})
    tag = f"-{variant}" if variant else ""
    label = dt + ("ieee" if precision == "ieee" else "")
    at = "" if cand is None else f"@{cand}"
    return [(f"gemm-{path}-{size}{at}-{label}{tag}-sm{arch}", "fastpeft.kernels.ia3", "_ia3_kernel", sig, ce, arch,
             cfg["num_warps"], cfg["num_stages"]) for arch in STATIC_ARCHS[path]]


def _static_cases():
    """(name, module, kernel, signature, constexprs, arch, num_warps, num_stages) for every shipped config."""
    from fastpeft.kernels import ia3 as k

    cases = []
    for dt in ("bf16", "fp32"):
        for path, table in k.GEMM_CONFIGS.items():
            for size in table:
                if dt == "bf16" or size == "large":
                    cases += _gemm_cases(k, path, size, dt)
                if dt == "bf16" and size != "large":
                    cases += _gemm_cases(k, path, size, dt, "dl")
    # fp32 with "ieee" dots (torch's default fp32 precision): FMA, its own tiles at every size (`tiles_for`)
    for path, table in k.GEMM_CONFIGS.items():
        for size in table:
            cases += _gemm_cases(k, path, size, "fp32", precision="ieee")
            if size != "large":
                cases += _gemm_cases(k, path, size, "fp32", "dl", precision="ieee")
    # the measured candidates other than the default: bf16 only (fp32 keeps the default, `gemm_candidates`)
    for path, sets in k.GEMM_CANDIDATES.items():
        for size, cands in sets.items():
            for cand in cands:
                if cand != k.DEFAULT_CANDIDATE:
                    cases += _gemm_cases(k, path, size, "bf16", cand=cand)
                    if size != "large":
                        cases += _gemm_cases(k, path, size, "bf16", "dl", cand=cand)
    return cases


def test_static_cases_cover_every_config():
    from fastpeft.kernels import ia3 as k

    names = [c[0] for c in _static_cases()]
    assert len(names) == len(set(names))
    for path, table in k.GEMM_CONFIGS.items():
        for size in table:
            for arch in STATIC_ARCHS[path]:
                assert f"gemm-{path}-{size}-bf16-sm{arch}" in names
                assert f"gemm-{path}-{size}-fp32ieee-sm{arch}" in names
                if size == "large":
                    assert f"gemm-{path}-{size}-fp32-sm{arch}" in names
                else:
                    assert f"gemm-{path}-{size}-bf16-dl-sm{arch}" in names
                    assert f"gemm-{path}-{size}-fp32ieee-dl-sm{arch}" in names
    for path, sets in k.GEMM_CANDIDATES.items():
        assert set(sets) == set(k.GEMM_CONFIGS[path])
        for size, cands in sets.items():
            assert cands[k.DEFAULT_CANDIDATE] is k.GEMM_CONFIGS[path][size] and len(cands) <= 3
            for cand in set(cands) - {k.DEFAULT_CANDIDATE}:
                for arch in STATIC_ARCHS[path]:
                    assert f"gemm-{path}-{size}@{cand}-bf16-sm{arch}" in names
    # the launcher picks exactly the tables' sizes, and "large" only for variants without prologue or reduction
    picked = {k.gemm_config_name(m, fused) for m in (1, 32, 33, 256, 257, 10 ** 6) for fused in (False, True)}
    assert picked == set(k.GEMM_CONFIGS["tma"]) == set(k.GEMM_CONFIGS["ptr"])
    assert all(k.gemm_config_name(m, True) != "large" for m in (1, 33, 257, 10 ** 6))


@pytest.mark.parametrize("case", [c[0] for c in _static_cases()])
def test_gpu_config_compiles_without_spills(case):
    check_report(case, *compile_reports([c for c in _static_cases() if c[0] == case])[case])


def test_hopper_tma_gemm_uses_warpgroup_mma():
    case = [c for c in _static_cases() if c[0] == "gemm-tma-large-bf16-sm90"]
    rep, err = compile_reports(case)[case[0][0]]
    assert err is None and rep["wgmma"] > 0, (rep, err)


if __name__ == "__main__":
    for name, (rep, err) in compile_reports(_static_cases()).items():
        print(f"{name:30s} {err or rep}", flush=True)
