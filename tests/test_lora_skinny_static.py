"""The cuBLAS backend's skinny kernel (kernels/lora_skinny.py `_lora_expand_kernel`: C = c·keep⊙(L·Rm) + bias,
written once as the C input of cuBLAS's GEMM) compiles for every configuration its launcher can pick, for sm_80
and sm_90, with no register spills and with tensor-core instructions (except fp32 at "ieee" precision, which
has none to use). Ahead-of-time compile, no GPU needed (tests/static_compile.py).

Per config: the smallest and the largest rank chunk; the forward variant (bias, no dropout) for the configs
without dropout; for the dropout configs the backward variant (dropout, no bias) with the seed as an int and as a
tensor the kernel loads (SEED_PTR, CUDA graphs: "...-tensorseed..."). bf16 stands for fp16 (same layouts).
Run `python tests/test_lora_skinny_static.py` for the full report.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from static_compile import compile_in_subprocesses, compile_report, static_failures  # noqa: E402

ARCHS = (80, 90)


def _cases():
    from fastpeft.kernels import lora_skinny as k

    cases = []
    for cfg_name, cfg in k.EXPAND_CONFIGS.items():
        dropout = cfg_name.endswith("_dropout")
        dt, precision = ("bf16", "tf32") if cfg_name.startswith("16bit") else ("fp32", "ieee" if cfg_name.startswith("ieee") else "tf32")
        label = dt + ("ieee" if precision == "ieee" else "")
        chunks = sorted({k.expand_rank_block(r, cfg) for r in (1, 16, 32, 64, 128, 256)})
        tile = {n: v for n, v in cfg.items() if n.startswith("BLOCK_")}
        variants = ((False, True, False),) if not dropout else ((True, False, False), (True, False, True))
        for br in sorted({chunks[0], chunks[-1]}):
            for has_dropout, has_bias, seed_ptr in variants:
                sig = {"L": f"*{dt}", "RM": f"*{dt}", "BIAS": f"*{dt}", "OUT": f"*{dt}",
                       **{n: "i32" for n in ("M", "N", "R", "stride_lm", "stride_lr", "stride_rr", "stride_rn",
                                             "stride_om", "stride_on", "stride_bias")},
                       "scale": "fp32", "seed": "*i64" if seed_ptr else "i32", "thr": "i32"}
                ce = dict(HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, SEED_PTR=seed_ptr, DOT_PRECISION=precision,
                          BLOCK_R=br, **tile)
                direction = "bwd-dropout" if has_dropout else "fwd"
                for arch in ARCHS:
                    name = f"expand-{cfg_name}-r{br}-{direction}-{label}{'-tensorseed' if seed_ptr else ''}-sm{arch}"
                    cases.append((name, sig, ce, arch, cfg["num_warps"], cfg["num_stages"]))
    return cases


def _compile(case):
    name, sig, ce, arch, warps, stages = case
    from fastpeft.kernels import lora_skinny as k

    try:
        return name, compile_report(k._lora_expand_kernel, sig, ce, arch, warps, stages), None
    except Exception as exc:  # reported per case below
        return name, None, f"{type(exc).__name__}: {str(exc)[:400]}"


@pytest.fixture(scope="module")
def reports():
    return compile_in_subprocesses(_compile, _cases())


def test_every_config_is_enumerated():
    from fastpeft.kernels import lora_skinny as k

    names = [c[0] for c in _cases()]
    assert len(names) == len(set(names))
    for cfg_name in k.EXPAND_CONFIGS:
        assert any(n.startswith(f"expand-{cfg_name}-") for n in names), cfg_name
    assert "expand-16bit_dropout-r32-bwd-dropout-bf16-tensorseed-sm90" in names
    assert "expand-ieee-r16-fwd-fp32ieee-sm80" in names


def test_launcher_picks_an_enumerated_config(monkeypatch):
    from fastpeft.kernels import common, lora_skinny as k

    monkeypatch.setattr(k, "interpreting", lambda: False)
    for precision in ("highest", "high"):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for dropout in (False, True):
                name = k.expand_config_name(dtype, dropout)
                assert k.expand_config(dtype, dropout) == k.EXPAND_CONFIGS[name]
                assert name.endswith("_dropout") == dropout
                assert (name.startswith("ieee")) == (dtype == torch.float32 and precision == "highest")
    assert common.fma_dots(torch.float32, "ieee")


def test_compiles_without_spills_and_with_tensor_cores(reports):
    failures = static_failures(reports)
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    for name, rep, err in compile_in_subprocesses(_compile, _cases()):
        print(name, err or rep)
