"""backend="cublas" of fastpeft.ia3_linear (ops/ia3_cublas.py): cuBLAS GEMMs, the vector in one Triton pass
(kernels/ia3.py `ia3_scale_reduce`) on W or on the activations by the byte rule, against the float64 reference:
output and every gradient, both modes, both sides of the rule, fp32 and fp16 (bf16 on CUDA: the Triton
interpreter computes bf16 wrongly), odd shapes, M=1, every layout, bias or none; agreement with the torch and
triton backends; the row-chunked recompute; bounded temporaries; the custom op; errors. On the CPU the Triton
pass runs under the interpreter and torch.mm stands in for cuBLAS. Static compile of the pass for sm_80/sm_90.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fastpeft  # noqa: E402
from fastpeft.modules.ia3 import IA3Linear  # noqa: E402
from fastpeft.ops import ia3_cublas  # noqa: E402
from fastpeft.ops.ia3 import ia3_linear  # noqa: E402
from alloc_recorder import AllocRecorder  # noqa: E402
from test_adapter import LAYOUTS, with_layout  # noqa: E402
from test_ia3 import DEVICE, check, check_given, make, reference  # noqa: E402
from tolerances import assert_close  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (M, K=in, N=out): output scaling takes the weight side when M > K, input scaling when M > N
SHAPES = [(37, 40, 23),  # output: activations (y pass, dY⊙l); input: weight side
          (60, 20, 30),  # both modes: weight side
          (5, 33, 40),   # both modes: activation side
          (1, 17, 9)]    # M = 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["output", "input"])
def test_matches_float64(dtype, mode):
    for i, (M, K, N) in enumerate(SHAPES):
        check("cublas", dtype, mode, *make(M, K, N, mode, dtype, bias=i % 2 == 0, seed=i))


@pytest.mark.parametrize("mode", ["output", "input"])
def test_fp32_vector_3d_input_and_zero_entries(mode):
    check("cublas", torch.float16, mode, *make(6, 24, 16, mode, torch.float16, ldtype=torch.float32, lead=(3,)))
    check("cublas", torch.float32, mode, *make(19, 24, 21, mode, torch.float32, zeros=(0, 5, 20)))


@pytest.mark.parametrize("mode", ["output", "input"])
def test_agrees_with_torch_and_triton(mode):
    x, w, b, l = make(29, 36, 20, mode, torch.float32)
    dy = torch.randn(29, 20, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    results = {}
    for backend in ("cublas", "torch", "triton"):
        xi, li = x.detach().clone().requires_grad_(True), l.detach().clone().requires_grad_(True)
        y = ia3_linear(xi, w, b, li, mode, backend=backend)
        results[backend] = (y, *torch.autograd.grad(y, [xi, li], dy))
    for other in ("torch", "triton"):
        for name, got, ref in zip(("y", "dx", "dl"), results["cublas"], results[other]):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{name} vs {other}")


def test_every_argument_at_every_layout():
    """x, W, b, l and dY at each layout at once (stride 0 included), both modes and both sides of the rule."""
    for kind in LAYOUTS:
        for mode in ("output", "input"):
            for M in (7, 30):  # K = 24, N = 16: M = 7 the activation side, M = 30 the weight side
                x, w, b, l = make(M, 24, 16, mode, torch.float32, seed=M)
                dy = torch.randn(M, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE)
                x, w, b, l, dy = (with_layout(t, kind) for t in (x, w, b, l, dy))
                check_given("cublas", torch.float32, mode, x, w, b, l, dy, what=f"({kind}, {mode}, M={M})")


@pytest.mark.parametrize("mode", ["output", "input"])
def test_partial_gradients(mode):
    """dx alone and dl alone, each on both sides of the rule (input scaling's dx alone has its own paths)."""
    for M in (9, 40):  # K = 32, N = 24
        x, w, b, l = make(M, 32, 24, mode, torch.float32, seed=M)
        dy = torch.randn(M, 24, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        _, gx64, gl64 = reference(x, w, b, l, mode, dy)
        l.requires_grad_(True)
        (gl,) = torch.autograd.grad(ia3_linear(x, w, b, l, mode, backend="cublas"), [l], dy)
        assert_close(gl, gl64, torch.float32, f"d_scale alone (M={M})")
        l.requires_grad_(False)
        x.requires_grad_(True)
        (gx,) = torch.autograd.grad(ia3_linear(x, w, b, l, mode, backend="cublas"), [x], dy)
        assert_close(gx, gx64, torch.float32, f"dx alone (M={M})")


def test_weight_side_rule():
    assert ia3_cublas.weight_side(4097, 4096) and not ia3_cublas.weight_side(4096, 4096)
    assert not ia3_cublas.weight_side(1, 4096)


@pytest.mark.parametrize("mode", ["output", "input"])
def test_rule_picks_the_side_and_bounds_temporaries(monkeypatch, mode):
    """Activation side (M <= the other dimension): no [out, in] temporary. Weight side: one, and nothing
    [M, ·]-sized but the outputs. The recomputed product in row chunks of at most the weight's size (CHUNK_BYTES
    lowered to 0): the results stay exact, and two runs agree bit for bit (fixed summation order)."""
    monkeypatch.setattr(ia3_cublas, "CHUNK_BYTES", 0)
    K, N = 12, 10
    for M, weight_side in ((5, False), (70, True)):
        x, w, b, l = make(M, K, N, mode, torch.float32, seed=M)
        x.requires_grad_(True)
        l.requires_grad_(True)
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(6)).to(DEVICE)
        with AllocRecorder() as rec:
            y = ia3_linear(x, w, b, l, mode, backend="cublas")
            gx, gl = torch.autograd.grad(y, [x, l], dy)
        shapes = [a.shape for a in rec.allocations]
        assert ((N, K) in shapes) == weight_side, shapes  # W' exactly when the rule says so
        outputs = {(M, N), (M, K)}
        big = [a for a in rec.allocations if a.numel > N * K and a.shape not in outputs]
        assert not big, f"temporaries over the weight's size: {[(a.op, a.shape) for a in big]}"
        if weight_side:  # no [M, ·] temporary besides y and dX themselves
            assert sum(s in outputs for s in shapes) <= 2, shapes
        y64, gx64, gl64 = reference(x, w, b, l, mode, dy)
        assert_close(y, y64, torch.float32, "y")
        assert_close(gx, gx64, torch.float32, "dx")
        assert_close(gl, gl64, torch.float32, "d_scale")
        (gl2,) = torch.autograd.grad(ia3_linear(x, w, b, l, mode, backend="cublas"), [l], dy)
        assert torch.equal(gl, gl2)


def test_module_cached_path_and_in_place_edit():
    for mode in ("output", "input"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(20, 12).to(DEVICE)
        layers = {be: IA3Linear(lin, scale=mode, backend=be) for be in ("cublas", "torch")}
        x = torch.randn(3, 9, 20, device=DEVICE)
        grads = {}
        for be, layer in layers.items():
            with torch.no_grad():
                layer.ia3_scale.copy_(torch.linspace(0.5, 1.5, layer.ia3_scale.numel()))
            for _ in range(2):  # the second call takes the cached plan
                layer.ia3_scale.grad = None
                layer(x).relu_().sum().backward()
            grads[be] = layer.ia3_scale.grad
        torch.testing.assert_close(grads["cublas"], grads["torch"], rtol=1e-5, atol=1e-5)


def test_custom_op_accepts_cublas():
    """The torch.library ops (what torch.compile traces) take the backend name and run the cuBLAS path."""
    for mode in ("output", "input"):
        x, w, b, l = make(11, 16, 12, mode, torch.float32)
        x.requires_grad_(True)
        l.requires_grad_(True)
        y = torch.ops.fastpeft.ia3_linear_fwd(x, w, b, l, mode, "cublas")
        dy = torch.randn_like(y)
        gx, gl = torch.autograd.grad(y, [x, l], dy)
        y64, gx64, gl64 = reference(x, w, b, l, mode, dy)
        assert_close(y, y64, torch.float32, "y (op)")
        assert_close(gx, gx64, torch.float32, "dx (op)")
        assert_close(gl, gl64, torch.float32, "d_scale (op)")


def test_empty_batch_and_inference():
    x, w, b, l = make(0, 16, 8, "output", torch.float32)
    x.requires_grad_(True)
    l.requires_grad_(True)
    y = ia3_linear(x, w, b, l, "output", backend="cublas")
    gx, gl = torch.autograd.grad(y.sum(), [x, l])
    assert y.shape == (0, 8) and gx.shape == (0, 16) and torch.equal(gl, torch.zeros_like(gl))
    x, w, b, l = make(4, 16, 8, "input", torch.float16)
    with torch.no_grad():
        y = ia3_linear(x, w, b, l, "input", backend="cublas")
    assert_close(y, reference(x, w, b, l, "input", torch.zeros(4, 8))[0], torch.float16, "y (no grad)")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU message")
def test_explicit_cublas_on_cpu_without_interpreter_says_why(monkeypatch):
    x, w, b, l = make(4, 8, 6, "output", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastpeft.BackendUnavailableError, match=r"backend='cublas' cannot run: .*CUDA tensors"):
        ia3_linear(x, w, b, l, "output", backend="cublas")
    torch.testing.assert_close(ia3_linear(x, w, b, l, "output"), (x @ w.t() + b) * l)  # auto: torch


def test_bad_inputs_raise_before_any_launch():
    x, w, b, l = make(4, 8, 6, "output", torch.float32)
    with pytest.raises(ValueError, match=r"scale: expected shape \[8\]"):
        ia3_linear(x, w, b, l, "input", backend="cublas")
    with pytest.raises(TypeError, match="weight: expected dtype torch.float16"):
        ia3_linear(x.half(), w, b, l, "output", backend="cublas")


# --------------------------------------------------------------------------------------------------
# static compile of the pass (no GPU needed): every variant the launcher can run, bf16 (standing for 16-bit)
# and fp32, runtime strides, sm_80 and sm_90: no spills. It has no tl.dot, so no tensor cores to expect.

from static_compile import compile_in_subprocesses, compile_report, static_failures  # noqa: E402

ARCHS = (80, 90)
VARIANTS = {"scale": (True, False), "reduce": (False, True), "scale_reduce": (True, True)}


def _static_cases():
    from fastpeft.kernels import ia3 as k

    cfg = k.SCALE_REDUCE_CONFIG
    cases = []
    # the vector's dtype changes one [BLOCK_N] load: a 16-bit one with the plain scale, an fp32 one with both
    for dt in ("bf16", "fp32"):
        for variant, (has_scale, has_red) in VARIANTS.items():
            sdt = "bf16" if dt == "bf16" and variant == "scale" else "fp32"
            sig = {"A": f"*{dt}", "E": f"*{dt}", "SCALE": f"*{sdt}", "OUT": f"*{dt}", "P": "*fp32",
                   **{n: "i32" for n in ("M", "N", "rows_per", "stride_am", "stride_an", "stride_em", "stride_en",
                                         "stride_om", "stride_on", "stride_scale")}}
            ce = dict(HAS_SCALE=has_scale, HAS_RED=has_red, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
            for arch in ARCHS:
                cases.append((f"scale_reduce-{variant}-{dt}-l{sdt}-sm{arch}", sig, ce, arch, cfg["num_warps"],
                              cfg["num_stages"]))
    return cases


def _compile(case):
    name, sig, ce, arch, warps, stages = case
    from fastpeft.kernels import ia3 as k

    try:
        return name, compile_report(k._ia3_scale_reduce_kernel, sig, ce, arch, warps, stages), None
    except Exception as exc:  # reported per case below
        return name, None, f"{type(exc).__name__}: {str(exc)[:400]}"


def test_launcher_config_is_the_compiled_one(monkeypatch):
    from fastpeft.kernels import ia3 as k

    monkeypatch.setattr(k, "interpreting", lambda: False)
    assert k.scale_reduce_config() == k.SCALE_REDUCE_CONFIG  # one config for every dtype and variant


def test_scale_reduce_compiles_without_spills():
    failures = static_failures(compile_in_subprocesses(_compile, _static_cases()), has_dot=lambda name: False)
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    for name, rep, err in compile_in_subprocesses(_compile, _static_cases()):
        print(name, err or rep)
