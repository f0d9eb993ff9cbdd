"""Every configuration the QLoRA GEMM launcher can pick compiles for sm_80 and sm_90 with no register spills and
with tensor-core instructions on its dots (fp32 at "ieee": none), as launched: enable_fp_fusion=False.

Per size (decode, mid, large) and dtype (bf16 stands for fp16; fp32 with TF32 dots and with "ieee" ones) the
variants a launch can select: the forward with bias, with one scale per tile row and with scales gathered per
element from codes that straddle bytes (odd in_features: the heaviest prologue), double quantization on; the
backward rounding through the quantization dtype; the backward with dropout and the seed as a tensor.
The skinny kernels are LoRA's (tests/test_lora_kernels_static.py covers them).
Run `python tests/test_qlora_static.py` for the full report.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from static_compile import _nvidia_tool, compile_in_subprocesses, tensor_core_failure  # noqa: E402

ARCHS = (80, 90)
# (name, TRANS_W, HAS_BIAS, HAS_DROPOUT, SEED_PTR, NESTED, PAIRED, ROW_SCALE, MID)
VARIANTS = (
    ("fwd-rowscale", False, True, False, False, True, True, True, 0),
    ("fwd-gather", False, True, False, False, True, False, False, 0),
    ("bwd-mid", True, False, False, False, True, True, True, 1),
    ("bwd-dropout-tensorseed-gather", True, False, True, True, True, False, False, 0),
)


def _report(fn, signature, constexprs, arch, num_warps, num_stages):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": False})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    finally:
        os.unlink(cubin)
    m = re.search(r"STACK:(\d+)", usage)
    ptx = kernel.asm["ptx"]
    tc = len(re.findall(r"\bwgmma\.mma_async", ptx)) + len(re.findall(r"\bmma\.sync", ptx))
    return {"stack": int(m.group(1)) if m else None, "tensor_core": tc > 0, "shared": kernel.metadata.shared}


def _cases():
    from fastpeft.kernels import qlora_linear as k

    cases = []
    for dt, dtype, precision in (("bf16", torch.bfloat16, "tf32"), ("fp32", torch.float32, "tf32"),
                                 ("fp32ieee", torch.float32, "ieee")):
        tdt = "bf16" if dtype == torch.bfloat16 else "fp32"
        for size, table in k.QLORA_GEMM_CONFIGS.items():
            cfg = k.tiles_for(table, dtype, precision)
            tile = {n: v for n, v in cfg.items() if n.startswith(("BLOCK_", "GROUP_"))}
            for name, trans_w, bias, dropout, seed_ptr, nested, paired, row_scale, mid in VARIANTS:
                sig = {"P": f"*{tdt}", "W": "*u8", "ABSMAX": "*u8", "CODE": "*fp32", "ABSMAX2": "*fp32",
                       "CODE2": "*fp32", "OFFSET": "*fp32", "L": f"*{tdt}", "RM": f"*{tdt}", "BIAS": f"*{tdt}",
                       "OUT": f"*{tdt}",
                       **{n: "i32" for n in ("M", "N", "K", "R", "WK", "BS", "BS2", "stride_pm", "stride_pk",
                                             "stride_lm", "stride_lr", "stride_rr", "stride_rn", "stride_om",
                                             "stride_on", "stride_bias")},
                       "lora_scale": "fp32", "seed": "*i64" if seed_ptr else "i32", "thr": "i32"}
                ce = dict(TRANS_W=trans_w, NESTED=nested, PAIRED=paired, ROW_SCALE=row_scale,
                          MID=mid if dtype != torch.float32 else 0, HAS_BIAS=bias, HAS_DROPOUT=dropout,
                          SEED_PTR=seed_ptr, EVEN_K=False, DOT_PRECISION=precision,
                          BLOCK_R=min(32, cfg["RANK_CHUNK"]), **tile)
                for arch in ARCHS:
                    cases.append((f"qlora-{size}-{name}-{dt}-sm{arch}", sig, ce, arch, cfg["num_warps"],
                                  cfg["num_stages"]))
    return cases


def _compile(case):
    name, sig, ce, arch, warps, stages = case
    from fastpeft.kernels import qlora_linear as k

    try:
        return name, _report(k._qlora_gemm_kernel, sig, ce, arch, warps, stages), None
    except Exception as e:  # reported, not raised, so one failure does not hide the others
        return name, None, f"{type(e).__name__}: {e}"[:500]


def _failures(results):
    out = []
    for name, rep, err in results:
        if err is not None:
            out.append(f"{name}: {err}")
            continue
        if rep["stack"]:
            out.append(f"{name}: {rep['stack']} bytes of stack (spills)")
        tc = tensor_core_failure(name, rep)
        if tc:
            out.append(tc)
    return out


@pytest.fixture(scope="module")
def results():
    if not os.path.exists(_nvidia_tool("cuobjdump")) and _nvidia_tool("cuobjdump") == "cuobjdump":
        pytest.skip("no cuobjdump (Triton's NVIDIA backend tools)")
    return compile_in_subprocesses(_compile, _cases())


def test_qlora_gemm_configs_compile_without_spills(results):
    assert len(results) == 3 * len(VARIANTS) * 3 * len(ARCHS)
    failures = _failures(results)
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    for name, rep, err in compile_in_subprocesses(_compile, _cases()):
        print(name, err or rep)
