"""The packed-mask kernels (dropout_mask="packed") compile for every configuration their launchers can pick, for
their architectures, with no register spills and with tensor-core instructions (fp32 at "ieee": none), as
tests/test_lora_kernels_static.py requires of the others; no GPU needed.

The cases are the regenerating kernels' own (that file's and tests/test_lora_skinny_static.py's enumerations)
turned into their packed twins, which take the same tiles:
  _lora_shrink_packed_kernel    every shrink case (int and tensor seed: it still draws the mask, and stores it)
  _lora_bwd_da_packed_kernel    every dA case with dropout (no seed: it reads the bits)
  _lora_gemm_packed_kernel      the backward's dX GEMM with dropout, per size of GEMM_CONFIGS (the packed launch
                                takes the static tiles, gemm_config)
  _lora_expand_packed_kernel    the cuBLAS backend's skinny kernel, its dropout configs
plus the benchmark's mask-only kernel (kernels/philox.py COUNT_CONFIG). Run `python tests/test_lora_dropout_static.py`
for the full report.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

import test_lora_kernels_static as kst  # noqa: E402
import test_lora_skinny_static as sst  # noqa: E402
from static_compile import compile_in_subprocesses, compile_report, static_failures  # noqa: E402

_SEEDLESS = ("seed", "thr", "HAS_DROPOUT", "SEED_PTR")  # what a kernel reading the bits does not take


def _packed(case, fn, module, tag, seedless, tiles=None):
    """A regenerating kernel's case as its packed twin's: the mask pointer and its row stride added, the seed
    dropped where the twin reads bits; tiles(BLOCK_M, BLOCK_K) -> the twin's tiles (the launcher's packed_tiles)."""
    name, _, sig, ce, arch, warps, stages = case
    drop = _SEEDLESS if seedless else ()
    sig = {**{n: t for n, t in sig.items() if n not in drop}, "MASK": "*u8", "stride_mask": "i32"}
    ce = {n: v for n, v in ce.items() if n not in drop}
    if tiles is not None:
        ce.update(tiles(ce["BLOCK_M"], ce["BLOCK_K"]))
    return name.replace(tag, tag + "-packed", 1), module, fn, sig, ce, arch, warps, stages


def _cases():
    from fastpeft.kernels import lora_linear as k

    cases = []
    for dt, dtype, precision, extremes in (("bf16", torch.bfloat16, "tf32", True), ("fp32", torch.float32, "tf32", False),
                                           ("fp32", torch.float32, "ieee", False)):
        sizes = ("decode", "mid", "large_dropout")
        for case in kst._gemm_cases(k, dt, dtype, sizes, extremes, {s: (kst.BWD_DROPOUT,) for s in sizes}, precision):
            cases.append(_packed(case, "_lora_gemm_packed_kernel", "lora_linear", "-bwd-dropout", True))
        for case in kst._skinny_cases(k, dt, dtype, k.RANK_BLOCKS, precision):
            kind = case[0].split("-")[0]

            def tiles(bm, bk, kind=kind, dtype=dtype, precision=precision):
                cfg = k.packed_tiles(kind, dict(BLOCK_M=bm, BLOCK_K=bk), dtype, precision)
                return {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_K": cfg["BLOCK_K"]}

            if kind == "shrink":
                cases.append(_packed(case, "_lora_shrink_packed_kernel", "lora_linear", "shrink", False, tiles))
            elif kind == "da" and "tensorseed" not in case[0]:
                cases.append(_packed(case, "_lora_bwd_da_packed_kernel", "lora_linear", "da", True, tiles))
    for name, sig, ce, arch, warps, stages in sst._cases():
        if ce["HAS_DROPOUT"] and not ce["SEED_PTR"]:
            cases.append(_packed((name, None, sig, ce, arch, warps, stages), "_lora_expand_packed_kernel",
                                 "lora_skinny", "-bwd-dropout", True))
    from fastpeft.kernels.philox import COUNT_CONFIG as c

    for arch in (80, 90):
        cases.append((f"count-sm{arch}", "philox", "_dropout_count_kernel",
                      {"COUNT": "*i32", "M": "i32", "K": "i32", "seed": "i32", "thr": "i32"},
                      {"BLOCK_M": c["BLOCK_M"], "BLOCK_K": c["BLOCK_K"]}, arch, c["num_warps"], c["num_stages"]))
    return cases


def _compile(case):
    import importlib

    name, module, fn, sig, ce, arch, warps, stages = case
    try:
        kernel = getattr(importlib.import_module(f"fastpeft.kernels.{module}"), fn)
        return name, compile_report(kernel, sig, ce, arch, warps, stages), None
    except Exception as exc:  # reported per case below
        return name, None, f"{type(exc).__name__}: {str(exc)[:400]}"


@pytest.fixture(scope="module")
def reports():
    return compile_in_subprocesses(_compile, _cases())


def test_every_packed_variant_is_enumerated():
    names = [c[0] for c in _cases()]
    assert len(names) == len(set(names))
    for must in ("gemm-tma-large_dropout-r32-bwd-dropout-packed-bf16-sm90", "gemm-ptr-decode-r8-bwd-dropout-packed-fp32ieee-sm80",
                 "shrink-packed-tma-r256-bf16-tensorseed-sm90", "shrink-packed-ptr-r16-fp32ieee-sm80",
                 "da-packed-tma-r256-bf16-sm90", "da-packed-ptr-r16-fp32ieee-sm80",
                 "expand-16bit_dropout-r32-bwd-dropout-packed-bf16-sm90", "count-sm90"):
        assert must in names, must


def test_packed_kernels_compile_without_spills_and_with_tensor_cores(reports):
    failures = static_failures(reports, has_dot=lambda name: not name.startswith("count-"))  # count: no dot
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    for name, rep, err in compile_in_subprocesses(_compile, _cases()):
        print(f"{name:60s} {err or rep}", flush=True)
