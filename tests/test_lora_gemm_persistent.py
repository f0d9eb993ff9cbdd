"""The persistent LoRA GEMM (_lora_gemm_persistent_kernel: a fixed grid, each program looping over output tiles in
grouped order through the one tile body) under the interpreter: small odd shapes whose tiles outnumber the
programs, fp32 and fp16, with and without dropout and bias, Q stored [N, K] (forward) and [K, N] (backward);
equal to the one-tile-per-program kernel bit for bit, and to float64. Its GPU configs are compiled in
tests/test_lora_kernels_static.py; the config choice is tested in tests/test_autotune.py."""
import pytest
import torch

from conftest import DEVICE
from fastpeft.dropout import dropout_keep_mask, keep_threshold
from tolerances import assert_close

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's configs; a GPU's autotune runs cover it")

M, N, K, R = 45, 72, 56, 5  # 16x32 tiles: 3 x 3 = 9 tiles on 3 programs; K, N aligned for the "tma" path


def _case(dtype, q_kn, with_bias, seed=5):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(M, K, generator=g).to(dtype)
    q = (torch.randn(K, N, generator=g) / K ** 0.5).to(dtype)  # Q [K, N]
    q_t = q.t() if q_kn else q.t().contiguous()  # Qᵀ [N, K]: a view of row-major Q, or row-major itself
    lo = torch.randn(M, R, generator=g).to(dtype)
    rm_t = (torch.randn(N, R, generator=g) / R ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    return p, q_t, lo, rm_t, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_kn", [False, True], ids=["q_nk", "q_kn"])
@pytest.mark.parametrize("dropout,with_bias", [(False, True), (True, False)], ids=["bias", "dropout"])
def test_persistent_gemm_equals_the_tile_per_program_kernel_and_float64(dtype, q_kn, dropout, with_bias):
    from fastpeft.kernels import lora_linear as k
    from fastpeft.kernels.common import path_for
    from fastpeft.kernels.lora_gemm_tuning import persistent_programs

    p, q_t, lo, rm_t, bias = _case(dtype, q_kn, with_bias)
    prob, seed = 0.3, 1234
    drop = (seed, keep_threshold(prob)) if dropout else None
    cfg = k.INTERPRETER_CONFIGS["gemm_persistent"]
    tiles = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
    assert persistent_programs(p.device, tiles) * 3 <= tiles  # several tiles per program
    paths = ["tma", "ptr"] if not dropout and not q_kn else ["tma"]  # the pointer path once
    assert path_for(p.device, p, q_t.t() if q_kn else q_t) == "tma"
    out64 = p.double() @ q_t.double().t()
    low = 0.7 * (lo.double() @ rm_t.double().t())
    if dropout:
        low = low * dropout_keep_mask(seed, M, N, prob).double()
    ref = out64 + low + (bias.double() if bias is not None else 0)
    for path in paths:
        got = k.lora_gemm(p, q_t, lo, rm_t, bias, 0.7, drop, tuned=(path, cfg))
        one = k.lora_gemm(p, q_t, lo, rm_t, bias, 0.7, drop, tuned=(path, k.INTERPRETER_CONFIGS["gemm"]))
        assert torch.equal(got, one), path
        assert_close(got, ref, dtype, f"persistent {path}", k=K)


def test_persistent_gemm_with_no_rows():
    from fastpeft.kernels import lora_linear as k

    p, q_t, lo, rm_t, bias = _case(torch.float32, False, True)
    cfg = k.INTERPRETER_CONFIGS["gemm_persistent"]
    out = k.lora_gemm(p[:0], q_t, lo[:0], rm_t, bias, 0.7, None, tuned=("tma", cfg))
    assert out.shape == (0, N)
