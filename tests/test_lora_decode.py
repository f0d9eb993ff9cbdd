"""The one-launch decode forward (kernels/lora_decode.py `_lora_decode_kernel`, M <= 16 rows): y and the saved S
against float64 references and against the two-launch path (shrink, then GEMM) at the same seed, the dropout mask
bit for bit, any strides, the dispatch at 16 / 17 rows, autograd through fastpeft.lora_linear; and every config
its launcher can pick compiled for sm_80 and sm_90 with no spills and with tensor cores (fp32 at "ieee": FMA).

On the CPU the kernels run under the interpreter (tests/conftest.py; bf16 Triton is tested on CUDA only). Shapes
with 16-byte aligned rows take the tensor-descriptor path there, the others the pointer path.
Run `python tests/test_lora_decode.py` for the static report.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import DEVICE  # noqa: E402
from reference_lora import lora_reference, reference_with_grads  # noqa: E402
from static_compile import compile_in_subprocesses, compile_report, static_failures  # noqa: E402
from tolerances import assert_close  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.dropout import dropout_keep_mask, keep_threshold  # noqa: E402
from fastpeft.kernels import lora_decode as kd  # noqa: E402
from fastpeft.kernels import lora_linear as kl  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(m, k, n, r, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    return (rnd(m, k), rnd(n, k, scale=1 / math.sqrt(k)), rnd(r, k, scale=1 / math.sqrt(k)),
            rnd(n, r, scale=1 / math.sqrt(r)), rnd(n) if bias else None)


def _s_reference(x, a, p, seed):
    """S = dropout(x)·Aᵀ·(1/(1-p)) in float64 (fastpeft.dropout's mask, the Triton kernels' twin)."""
    x64 = x.double()
    if p > 0:
        x64 = x64 * dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device).double() / (1 - p)
    return x64 @ a.double().t()


def _two_launches(x, w, a, b, bias, scaling, p, seed):
    s = kl.lora_shrink(x, a, p, seed, keep_threshold(p) if p > 0 else 0)
    return kl.lora_gemm(x, w, s, b, bias, scaling, None), s


def _check(x, w, a, b, bias, scaling, p, seed, dtype):
    thr = keep_threshold(p) if p > 0 else 0
    y, s = kl.lora_linear_fwd(x, w, a, b, bias, scaling, p, seed, thr)
    assert y.shape == (x.shape[0], w.shape[0]) and s.shape == (x.shape[0], a.shape[0])
    assert y.dtype == s.dtype == x.dtype
    k = x.shape[1]
    assert_close(s, _s_reference(x, a, p, seed), dtype, "S", k=k)
    assert_close(y, lora_reference(x, w, a, b, bias, scaling, p, seed), dtype, "y", k=k)
    y2, s2 = _two_launches(x, w, a, b, bias, scaling, p, seed)
    assert_close(s, s2.double(), dtype, "S vs two launches", k=k)
    assert_close(y, y2.double(), dtype, "y vs two launches", k=k)


# (M, K, N, r, bias, p): every M of the decode range, odd N and K, ranks 1 to 64, an aligned (descriptor) case
CASES = [(1, 45, 53, 5, True, 0.0), (1, 37, 19, 1, False, 0.25), (2, 33, 40, 16, True, 0.5),
         (7, 64, 96, 16, False, 0.25), (16, 29, 70, 64, True, 0.1), (16, 48, 32, 5, False, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: "M{}-K{}-N{}-r{}-{}-p{}".format(*c[:4], "bias" if c[4] else "nobias", c[5]))
def test_matches_float64_and_the_two_launch_path(case, dtype):
    m, k, n, r, bias, p = case
    _check(*_inputs(m, k, n, r, dtype, bias), 1.75, p, 1234, dtype)


def test_one_launch_up_to_16_rows_then_two(monkeypatch):
    """lora_linear_fwd takes the decode kernel for 1..16 rows, the shrink and the GEMM from 17."""
    launched = []
    real = {name: getattr(kl, name) for name in ("_lora_shrink_kernel", "_lora_gemm_kernel")}
    real["_lora_decode_kernel"] = kd._lora_decode_kernel

    def spy(name, module):
        class Spy:
            def __getitem__(self, grid):
                launched.append(name)
                return real[name][grid]
        monkeypatch.setattr(module, name, Spy())

    spy("_lora_shrink_kernel", kl)
    spy("_lora_gemm_kernel", kl)
    spy("_lora_decode_kernel", kd)
    for m, expected in ((1, ["_lora_decode_kernel"]), (16, ["_lora_decode_kernel"]),
                        (17, ["_lora_shrink_kernel", "_lora_gemm_kernel"])):
        launched.clear()
        x, w, a, b, bias = _inputs(m, 24, 20, 3, torch.float32, True)
        y, s = kl.lora_linear_fwd(x, w, a, b, bias, 0.5, 0.0, 0, 0)
        assert launched == expected, (m, launched)
        assert_close(y, lora_reference(x, w, a, b, bias, 0.5), torch.float32, f"y at M={m}")


def test_dropout_mask_is_the_shrinks_bit_for_bit():
    """x = 1 and A = I: S = keep / (1 - p) = 2·keep exactly, whatever the summation order; the decode kernel's S
    equals fastpeft.dropout's mask and the shrink's S, with the seed as an int and as a device tensor."""
    m, k, p, seed = 13, 37, 0.5, 4242
    x = torch.ones(m, k, device=DEVICE)
    eye = torch.eye(k, device=DEVICE)
    w, b = torch.randn(19, k).to(DEVICE), torch.randn(19, k).to(DEVICE)
    expected = 2 * dropout_keep_mask(seed, m, k, p, device=DEVICE).float()
    assert 0 < int(expected.count_nonzero()) < m * k
    thr = keep_threshold(p)
    for sd in (seed, torch.tensor(seed, dtype=torch.int64, device=DEVICE)):
        y, s = kd.lora_decode(x, w, eye, b, None, 1.0, p, sd, thr)
        assert torch.equal(s, expected), f"mask differs at {(s != expected).nonzero()[:5].tolist()}"
    assert torch.equal(s, kl.lora_shrink(x, eye, p, seed, thr))
    assert_close(y, x.double() @ w.double().t() + expected.double() @ b.double().t(), torch.float32, "y")


def test_any_strides_and_every_output_element_written(monkeypatch):
    """x a column slice, W0 transposed storage, A every other row, B transposed storage, bias strided; outputs from a
    NaN-poisoned torch.empty."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    m, k, n, r, dtype, p = 3, 21, 27, 6, torch.float32, 0.25
    x0, w0, a0, b0, bias0 = _inputs(m, k, n, r, dtype, True, seed=5)
    x = torch.zeros(m, k + 7, device=DEVICE)[:, 3:3 + k]
    x.copy_(x0)
    w = w0.t().contiguous().t()  # strides (1, N)
    a = torch.zeros(2 * r, k, device=DEVICE)[::2]
    a.copy_(a0)
    b = b0.t().contiguous().t()
    bias = torch.zeros(2 * n, device=DEVICE)[::2]
    bias.copy_(bias0)
    assert not any(t.is_contiguous() for t in (x, w, a, b, bias))
    assert kl.path_for(x.device, x, w, a) == "ptr"
    _check(x, w, a, b, bias, 0.5, p, 77, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_through_lora_linear_at_one_row_with_dropout(dtype):
    """fastpeft.lora_linear at M = 1 with dropout: the decode forward, the unchanged backward, every gradient."""
    x, w, a, b, bias = _inputs(1, 40, 24, 8, dtype, True, seed=3)
    dy = torch.randn(1, 24, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bias)]
    y = fastpeft.lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0, bias=leaves[3], dropout_p=0.3, seed=99,
                             backend="triton")
    y.backward(dy)
    y_ref, grads = reference_with_grads(x, w, a, b, bias, 2.0, dy, 0.3, 99)
    assert_close(y, y_ref, dtype, "y")
    for name, leaf, ref in zip(("dx", "dA", "dB", "dbias"), leaves, (grads[0], grads[2], grads[3], grads[4])):
        assert_close(leaf.grad, ref, dtype, name)


# ----------------------------------------------------------------------------------------------- static
# Every DECODE_CONFIGS entry (one per path and padded rank) and dtype class (bf16 standing for fp16; fp32 with TF32
# dots and at "ieee", FMA dots) on its architectures ("tma": sm_90; "ptr": sm_80 and sm_90, where unaligned
# tensors take it), in its heaviest variant: bias and dropout with the seed loaded from a tensor (SEED_PTR, CUDA
# graphs). The inference variant (no dropout, int seed) and the int-seed dropout variant once per path.

ARCHS = {"tma": (90,), "ptr": (80, 90)}
PRECISIONS = {"bf16": (torch.bfloat16, "tf32"), "fp32": (torch.float32, "tf32"), "fp32ieee": (torch.float32, "ieee")}


def _case(path, br, label, arch, has_dropout=True, seed_ptr=True):
    dtype, precision = PRECISIONS[label]
    cfg = kd.tiles_for(kd.DECODE_CONFIGS[path][br], dtype, precision)
    dt = "bf16" if dtype == torch.bfloat16 else "fp32"
    sig = {name: f"*{dt}" for name in ("X", "W", "A", "B", "BIAS", "Y", "S")}
    sig.update({name: "i32" for name in ("M", "N", "K", "R", "stride_xm", "stride_xk", "stride_wn", "stride_wk",
                                         "stride_ar", "stride_ak", "stride_bn", "stride_br", "stride_ym",
                                         "stride_yn", "stride_sm", "stride_sr", "stride_bias")})
    sig.update(lora_scale="fp32", seed="*i64" if seed_ptr else "i32", thr="i32", drop_scale="fp32")
    ce = dict(HAS_BIAS=True, HAS_DROPOUT=has_dropout, SEED_PTR=seed_ptr, EVEN_K=False, DOT_PRECISION=precision,
              USE_TMA=path == "tma", BLOCK_M=kd.DECODE_MAX_ROWS, BLOCK_R=br,
              **{n: v for n, v in cfg.items() if n.startswith("BLOCK_")})
    variant = "dropout-tensorseed" if seed_ptr else ("dropout" if has_dropout else "fwd")
    return (f"decode-{path}-r{br}-{variant}-{label}-sm{arch}", sig, ce, arch, cfg["num_warps"], cfg["num_stages"])


def _cases():
    cases = [_case(path, br, label, arch) for path, table in kd.DECODE_CONFIGS.items() for br in table
             for label in PRECISIONS for arch in ARCHS[path]]
    for path in ARCHS:
        cases.append(_case(path, 32, "bf16", 90, has_dropout=False, seed_ptr=False))
        cases.append(_case(path, 256, "bf16", 90, has_dropout=True, seed_ptr=False))
    return cases


def _compile(case):
    name, sig, ce, arch, warps, stages = case
    try:
        return name, compile_report(kd._lora_decode_kernel, sig, ce, arch, warps, stages), None
    except Exception as exc:  # reported per case below
        return name, None, f"{type(exc).__name__}: {str(exc)[:400]}"


def test_launcher_picks_an_enumerated_config(monkeypatch):
    """On a GPU the launcher resolves DECODE_CONFIGS[path][decode_rank_block(R)] at the dot precision it passes,
    for every rank up to MAX_RANK: the entries compiled below."""
    monkeypatch.setattr(kd, "interpreting", lambda: False)
    assert set(kd.DECODE_CONFIGS["tma"]) == set(kd.DECODE_CONFIGS["ptr"]) == {32, 64, 128, 256}
    for precision in ("highest", "high"):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for path, table in kd.DECODE_CONFIGS.items():
                for r in (1, 16, 17, 33, 64, 65, 200, kl.MAX_RANK):
                    br = kd.decode_rank_block(r)
                    assert br in table and br >= r
                    assert kd.decode_config(r, dtype, path) == kd.tiles_for(table[br], dtype)
    names = [c[0] for c in _cases()]
    assert len(names) == len(set(names))
    for must in ("decode-tma-r32-dropout-tensorseed-bf16-sm90", "decode-ptr-r256-dropout-tensorseed-fp32ieee-sm80",
                 "decode-ptr-r64-dropout-tensorseed-fp32-sm90", "decode-tma-r32-fwd-bf16-sm90"):
        assert must in names


def test_compiles_without_spills_and_with_tensor_cores():
    failures = static_failures(compile_in_subprocesses(_compile, _cases()))
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    for name, rep, err in compile_in_subprocesses(_compile, _cases()):
        print(f"{name:55s} {err or rep}", flush=True)
