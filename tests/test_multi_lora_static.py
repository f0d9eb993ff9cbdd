"""Every configuration the multi-adapter LoRA launchers can pick on a GPU compiles with no register spills and
with tensor-core instructions wherever there is a tl.dot (Triton's ahead-of-time compile; no GPU needed).

GEMM: the "tma" path (W0 through a tensor descriptor) runs on sm_90, the "ptr" path on sm_80 and on sm_90
for unaligned W0; each size compiles forward (bias, per-adapter scaling) and backward (fp32 dS, W0 as
[K, N]) at its largest rank chunk. "expand": the same kernel without its K loop (HAS_BASE=False), the cuBLAS
backend's C and low, per EXPAND_CONFIGS entry both ways. The GEMM's measured candidates (GEMM_CANDIDATES, other than the
default) compile both ways at bf16 only: fp32 keeps the default. Skinny kernels (pointer loads only) compile
per rank bucket at its largest rank block for both architectures. bf16 stands for fp16 (same layouts);
fp32 (TF32 dots, halved tiles) compiles the heaviest tiles, and fp32 with "ieee" dots (torch's default fp32
precision: FMA dots, no tensor cores, their own tiles) the tightest ones. Keep the count small: each case
costs 1-3 s.
Run `python tests/test_multi_lora_static.py` for the full report.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from static_compile import compile_in_subprocesses, compile_report, static_failures  # noqa: E402

def _i32(*names):
    return {n: "i32" for n in names}


def _gemm_cases(k, dt, dtype, plan, precision="tf32"):
    """plan: (path, size, direction, arch) tuples; path "expand": the kernel without its K loop (HAS_BASE=False,
    the cuBLAS backend's C and low, EXPAND_CONFIGS), its sizes that table's."""
    cases = []
    label = dt + ("ieee" if precision == "ieee" else "")
    for path, size, direction, arch in plan:
        size, _, cand = size.partition("@")  # "<size>@<candidate>": a measured candidate (GEMM_CANDIDATES)
        table = k.EXPAND_CONFIGS if path == "expand" else k.GEMM_CONFIGS[path]
        cfg = k.tiles_for(k.GEMM_CANDIDATES[path][size][cand] if cand else table[size], dtype, precision)
        size += f"@{cand}" if cand else ""
        tile = {n: v for n, v in cfg.items() if n.startswith(("BLOCK_", "GROUP_"))}
        fwd = direction == "fwd"
        sig = {"P": f"*{dt}", "Q": f"*{dt}", "L": f"*{dt}" if fwd else "*fp32", "RM": f"*{dt}", "BIAS": f"*{dt}",
               "OUT": f"*{dt}", "IDS": "*i64", "SCALE": "*fp32", "RANKS": "*i32", "OFFS": "*i32",
               **_i32("M", "N", "K", "n_adapters", "stride_pm", "stride_pk", "stride_qk", "stride_qn", "stride_lm",
                      "stride_lr", "stride_rr", "stride_rn", "stride_om", "stride_on", "stride_id", "stride_bias",
                      "stride_scale")}
        ce = dict(HAS_BIAS=fwd, HAS_SCALE=fwd, HAS_BASE=path != "expand", EVEN_K=path == "expand",
                  DOT_PRECISION=precision, USE_TMA=path == "tma", Q_KN=not fwd and path != "expand",
                  BLOCK_R=cfg["RANK_CHUNK"], **tile)
        cases.append((f"gemm-{path}-{size}-{direction}-{label}-sm{arch}", "_multi_lora_gemm_kernel", sig, ce, arch,
                      cfg["num_warps"], cfg["num_stages"]))
    return cases


def _skinny_cases(k, dt, dtype, plan, precision="tf32"):
    """plan: (kind, rank bucket, arch) tuples; each at the bucket's largest rank block."""
    cases = []
    label = dt + ("ieee" if precision == "ieee" else "")
    for kind, bucket, arch in plan:
        cfg = k.SKINNY_CONFIGS[kind][bucket]
        if kind != "fixup":
            cfg = k.tiles_for(cfg, dtype, precision)
        tile = {n: v for n, v in cfg.items() if n.startswith("BLOCK_")}
        if kind == "shrink":
            fn = "_multi_lora_shrink_kernel"
            sig = {"X": f"*{dt}", "IDS": "*i64", "PERM": "*i64", "A": f"*{dt}", "RANKS": "*i32", "OFFS": "*i32",
                   "S": "*fp32", **_i32("M", "K", "n_adapters", "r_max", "k_per_split", "stride_id", "stride_xm",
                                        "stride_xk", "stride_ar", "stride_ak", "stride_sp", "stride_sm", "stride_sr")}
            ce = dict(PERMUTED=True, DOT_PRECISION=precision)
        elif kind == "dy":
            fn = "_multi_lora_bwd_dy_kernel"
            sig = {"DY": f"*{dt}", "B": f"*{dt}", "PERM": "*i64", "TILES": "*i32", "SCALE": "*fp32",
                   "RANKS": "*i32", "OFFS": "*i32", "DS": "*fp32",
                   **_i32("n_tiles", "N", "r_max", "n_per_split", "stride_dym", "stride_dyn", "stride_bn",
                          "stride_br", "stride_dsp", "stride_dsm", "stride_scale")}
            ce = dict(DOT_PRECISION=precision)
        elif kind == "red":  # dB's form (U = dY, V = S, scaled); dA's (U = x, V = fp32 dS) has no scale
            fn = "_multi_lora_seg_reduce_kernel"
            sig = {"U": f"*{dt}", "V": "*fp32", "PERM": "*i64", "TILES": "*i32", "TILE_CUM": "*i32",
                   "RANKS": "*i32", "OFFS": "*i32", "SCALE": "*fp32", "OUT": "*fp32", "PART": "*fp32",
                   **_i32("n_tiles", "tiles_per_split", "D", "r_max", "stride_um", "stride_ud", "stride_vm",
                          "stride_vr", "stride_od", "stride_or", "stride_scale")}
            ce = dict(HAS_SCALE=True, DOT_PRECISION=precision)
        else:
            fn = "_multi_lora_seg_fixup_kernel"
            sig = {"PART": "*fp32", "TILE_CUM": "*i32", "RANKS": "*i32", "OFFS": "*i32", "OUT": "*fp32",
                   **_i32("tiles_per_split", "D", "r_max", "stride_od", "stride_or")}
            ce = {}
        ce.update(BLOCK_R=k.rank_block(bucket), **tile)
        cases.append((f"{kind}-r{bucket}-{label}-sm{arch}", fn, sig, ce, arch, cfg["num_warps"], cfg["num_stages"]))
    return cases


def _cases():
    """(name, kernel attribute, signature, constexprs, arch, num_warps, num_stages) for every shipped config."""
    from fastpeft.kernels import multi_lora as k

    gemm = [("tma", size, d, 90) for size in k.GEMM_CONFIGS["tma"] for d in ("fwd", "bwd")]
    gemm += [("ptr", size, d, 80) for size in k.GEMM_CONFIGS["ptr"] for d in ("fwd", "bwd")]
    gemm += [("ptr", "large", d, 90) for d in ("fwd", "bwd")]
    # the measured candidates other than the default, both ways at bf16 only (fp32 keeps the default)
    gemm += [(path, f"{size}@{cand}", d, arch) for path, archs in (("tma", (90,)), ("ptr", (80, 90)))
             for size, cands in k.GEMM_CANDIDATES[path].items() for cand in cands if cand != "default"
             for d in ("fwd", "bwd") for arch in archs]
    buckets = sorted(k.SKINNY_CONFIGS["shrink"])
    skinny = [(kind, b, arch) for kind in ("shrink", "dy", "red") for b in buckets for arch in (80, 90)]
    skinny += [("fixup", b, 90) for b in buckets]
    # fp32 with "ieee" dots (torch's default fp32 precision: FMA, own tiles): the entries whose ieee tiles are
    # the tightest (checked once for every entry): the large GEMM both ways, the shrink and dy of each bucket
    ieee_gemm = [(p, "large", d, a) for p, archs in (("tma", (90,)), ("ptr", (80, 90))) for d in ("fwd", "bwd")
                 for a in archs]
    ieee_skinny = [(kind, b, arch) for kind in ("shrink", "dy", "red") for b in buckets for arch in (80, 90)]
    # the cuBLAS backend's C / low: every expand config both ways at bf16, each once at fp32 (tf32) and at "ieee"
    gemm += [("expand", size, d, arch) for size in k.EXPAND_CONFIGS for d in ("fwd", "bwd") for arch in (80, 90)]
    expand32 = [("expand", "tile", "fwd", 90), ("expand", "decode", "bwd", 80)]
    expand_ieee = [("expand", "tile", "bwd", 80), ("expand", "decode", "fwd", 90)]
    return (_gemm_cases(k, "fp32", torch.float32, expand32) + _gemm_cases(k, "fp32", torch.float32, expand_ieee, "ieee") +_gemm_cases(k, "bf16", torch.bfloat16, gemm) + _skinny_cases(k, "bf16", torch.bfloat16, skinny)
            + _gemm_cases(k, "fp32", torch.float32, [("tma", "large", "fwd", 90), ("ptr", "large", "bwd", 80)])
            + _skinny_cases(k, "fp32", torch.float32, [("shrink", buckets[-1], 80), ("dy", buckets[-1], 90)])
            + _gemm_cases(k, "fp32", torch.float32, ieee_gemm, "ieee")
            + _skinny_cases(k, "fp32", torch.float32, ieee_skinny, "ieee"))


def _compile(case):
    name, fn_name, sig, ce, arch, warps, stages = case
    from fastpeft.kernels import multi_lora as k

    try:
        return name, compile_report(getattr(k, fn_name), sig, ce, arch, warps, stages), None
    except Exception as exc:  # reported per case below
        return name, None, f"{type(exc).__name__}: {str(exc)[:400]}"


@pytest.fixture(scope="module")
def reports():
    return compile_in_subprocesses(_compile, _cases())


def test_every_config_is_enumerated():
    from fastpeft.kernels import multi_lora as k

    names = [c[0] for c in _cases()]
    # the seg-reduce kernel at "ieee"; 12 expand cases; 10 GEMM candidates
    assert len(names) == len(set(names)) and len(names) <= 74
    for path, table in k.GEMM_CONFIGS.items():
        for size in table:
            for d in ("fwd", "bwd"):
                assert any(n.startswith(f"gemm-{path}-{size}-{d}-bf16") for n in names), (path, size, d)
    for size in k.EXPAND_CONFIGS:
        for d in ("fwd", "bwd"):
            assert any(n.startswith(f"gemm-expand-{size}-{d}-bf16") for n in names), ("expand", size, d)
        assert any(n.startswith(f"gemm-expand-{size}-") and "fp32ieee" in n for n in names), ("expand ieee", size)
    assert {k.expand_config_name(m) for m in (1, 64, 65, 10**6)} == set(k.EXPAND_CONFIGS)
    for kind, table in k.SKINNY_CONFIGS.items():
        for bucket in table:
            assert any(n.startswith(f"{kind}-r{bucket}-bf16") for n in names), (kind, bucket)
    for path, sets in k.GEMM_CANDIDATES.items():
        assert set(sets) == set(k.GEMM_CONFIGS[path])
        for size, cands in sets.items():
            assert cands["default"] is k.GEMM_CONFIGS[path][size] and len(cands) <= 3
            for cand in set(cands) - {"default"}:
                for d in ("fwd", "bwd"):
                    assert any(n.startswith(f"gemm-{path}-{size}@{cand}-{d}-bf16") for n in names), (path, cand)
    # the launchers choose from these tables only
    assert {k.gemm_config_name(m) for m in (1, 64, 65, 256, 257, 10**6)} == set(k.GEMM_CONFIGS["tma"])
    assert {k.rank_bucket(r) for r in range(1, k.MAX_RANK + 1)} == set(k.SKINNY_CONFIGS["dy"])


def test_compiles_without_spills_and_with_tensor_cores(reports):
    failures = static_failures(reports, has_dot=lambda name: not name.startswith("fixup"))  # fixup: no dot
    assert not failures, "\n".join(failures)


def test_hopper_tma_gemm_uses_warpgroup_mma(reports):
    by_name = {name: rep for name, rep, _ in reports}
    rep = by_name["gemm-tma-large-fwd-bf16-sm90"]
    assert rep is not None and rep["hgmma"] > 0, rep


if __name__ == "__main__":
    for name, rep, err in compile_in_subprocesses(_compile, _cases()):
        print(f"{name:40s} {err or rep}", flush=True)
