"""backend="cublas" of fastpeft.multi_lora_linear (ops/multi_lora_cublas.py): cuBLAS GEMMs with the per-token
low-rank term as their C input, written once by the multi-LoRA GEMM kernel without its K loop (HAS_BASE=False),
against the float64 loop of single-adapter references (tests/test_multi_lora.py): the output and every
gradient, fp32 and fp16 (bf16 on CUDA: the Triton interpreter computes bf16 dots wrongly), odd shapes, M=1,
base-only tokens, mixed ranks, non-contiguous inputs, bias or none; and agreement with backend="triton".
On the CPU the Triton kernels run under the interpreter and torch.addmm stands in for cuBLAS.
"""
import pytest
import torch

import fastpeft
from fastpeft.ops.multi_lora import multi_lora_linear, resolve_multi_lora_backend
from tolerances import assert_close
from test_multi_lora import _case_inputs, _pool, _run, loop_reference

from conftest import DEVICE

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _check(got, ref, dtype, what=""):
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref):
        if g is None:
            continue
        if r.abs().sum() == 0:  # no adapter token: the pool gradient is exactly zero
            assert not g.any(), f"{what} {name}"
        else:
            assert_close(g, r, dtype, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["mixed-unsorted", "sorted-path", "M=1", "all-base"])
def test_matches_loop_of_single_adapter_references(dtype, case):
    """Mixed ranks (a rank-0 slot, pool not packed in id order), -1 ids, M=1, the sorted (M > 64) path."""
    if dtype == torch.float16 and case in ("M=1", "all-base") and DEVICE == "cpu":
        pytest.skip("covered in fp32 under the interpreter (time budget)")
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs(case, dtype)
    got = _run("cublas", x, w, a, b, bias, ids, sc, ranks, offs, dy)
    assert got[0].dtype == dtype and got[2].dtype == a.dtype and got[3].dtype == b.dtype
    _check(got, loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy), dtype, case)


def test_non_contiguous_inputs_no_bias_and_3d():
    ranks, offs, sc = [4, 7, 2], [9, 0, 7], [1.0, 1.5, 0.25]
    w, a, b, _ = _pool(30, 22, ranks, offs, torch.float32, seed=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 14, 60, generator=g).to(DEVICE)[:, 1:, ::2]  # 3-D, column-strided, not viewable as rows
    a = a.t().contiguous().t()  # column-major pool A and B
    b = b.t().contiguous().t()
    dy = torch.randn(22, 13, 3, generator=g).to(DEVICE).permute(2, 1, 0)  # non-contiguous upstream gradient
    ids = torch.randint(-1, 3, (3, 13), generator=g).to(DEVICE)
    got = _run("cublas", x, w, a, b, None, ids, sc, ranks, offs, dy)
    _check(got, loop_reference(x, w, a, b, None, ids, sc, ranks, offs, dy), torch.float32, "strided")


def test_fp32_pool_over_half_base_and_only_needed_gradients():
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("mixed-unsorted", torch.float16,
                                                              adapter_dtype=torch.float32)
    y, dx, da, db = _run("cublas", x, w, a, b, bias, ids, sc, ranks, offs, dy, requires=(True, False, True))
    y_ref, dx_ref, _, db_ref = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy)
    assert da is None and db.dtype == torch.float32
    _check((y, dx, None, db), (y_ref, dx_ref, None, db_ref), torch.float16, "fp32 pool")


def test_agrees_with_triton_and_inference_and_per_sequence_ids():
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("sorted-path", torch.float32)
    cub = _run("cublas", x, w, a, b, bias, ids, sc, ranks, offs, dy)
    tri = _run("triton", x, w, a, b, bias, ids, sc, ranks, offs, dy)
    for name, c, t in zip(("y", "dx", "dA", "dB"), cub, tri):
        torch.testing.assert_close(c, t, rtol=1e-5, atol=1e-5, msg=name)  # fp32 dots are exact in the interpreter
    with torch.no_grad():  # inference; per-sequence ids over a 3-D x
        x3 = x[:80].reshape(4, 20, -1)
        seq = torch.tensor([2, -1, 0, 1], device=DEVICE)
        y3 = multi_lora_linear(x3, w, a, b, seq, sc, ranks, offs, bias=bias, backend="cublas")
    y_ref = loop_reference(x3, w, a, b, bias, seq[:, None].expand(4, 20), sc, ranks, offs, torch.zeros_like(y3))[0]
    assert_close(y3, y_ref, torch.float32, "per-sequence y")


def test_every_output_element_is_written(monkeypatch):
    """Outputs and temporaries from torch.empty / new_empty are NaN-filled; nothing of it may survive."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("mixed-unsorted", torch.float32)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    got = _run("cublas", x, w, a, b, bias, ids, sc, ranks, offs, dy)
    monkeypatch.undo()
    _check(got, loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy), torch.float32, "poisoned")


def test_module_and_torch_library_ops_accept_cublas():
    """MultiLoRALinear(backend="cublas") matches "triton"; the torch.library ops (what torch.compile traces) pass
    torch.library.opcheck with backend "cublas" (tests/test_opcheck.py's multi-LoRA cases)."""
    from test_opcheck import DEFAULT_UTILS, _multi_lora_cases

    base = torch.nn.Linear(12, 9).to(DEVICE)
    m = fastpeft.MultiLoRALinear(base, num_adapters=3, r=4, backend="cublas")
    with torch.no_grad():
        m.lora_B.normal_()
    ids = torch.tensor([0, 2, -1, 1, 2], device=DEVICE)
    x0 = torch.randn(5, 12, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outs = []
    for backend in ("cublas", "triton"):
        m.backend = backend
        x = x0.clone().requires_grad_()
        y = m(x, ids)
        y.square().sum().backward()
        outs.append((y, x.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()))
        m.zero_grad()
    for name, c, t in zip(("y", "dx", "dA", "dB"), *outs):
        torch.testing.assert_close(c, t, msg=name)
    cases = _multi_lora_cases("cublas", torch.float32, torch.Generator().manual_seed(0))
    for overload, args in (cases[2], cases[4]):  # the forward with bias, the backward of every gradient
        torch.library.opcheck(overload, args, test_utils=DEFAULT_UTILS)

@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU messages")
def test_refused_with_the_reason(monkeypatch):
    from fastpeft.limits import MULTI_LORA_MAX_RANK_TRITON as LIMIT

    with pytest.raises(fastpeft.BackendUnavailableError, match=f"backend='cublas' cannot run: max_rank={LIMIT + 1}"):
        resolve_multi_lora_backend("cublas", torch.device(DEVICE), LIMIT + 1)
    assert resolve_multi_lora_backend("auto", torch.device(DEVICE), 8) == "torch"  # auto never picks it on the CPU
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("M=1", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastpeft.BackendUnavailableError, match=r"backend='cublas' cannot run: .*CUDA tensors"):
        multi_lora_linear(x, w, a, b, ids, sc, ranks, offs, backend="cublas")
