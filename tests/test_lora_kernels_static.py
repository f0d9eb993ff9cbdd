"""Every configuration the LoRA launchers can pick on a GPU compiles for its architectures with no register
spills and with tensor-core instructions (Triton's ahead-of-time compile; no GPU needed).

The "tma" path is launched only on sm_90+, the "ptr" path on sm_80 and on sm_90 for unaligned tensors.
The skinny kernels compile with every optional feature on (their heaviest variant); the GEMM compiles each
variant that can select a config. bf16 and fp16 share register and shared-memory layouts, so bf16 stands
for both; fp32 has its own halved tiles, compiled with TF32 dots and with "ieee" ones (torch's default fp32
matmul precision 'highest'): those run on FMA units, with no tensor-core instruction, and take their own
smaller reduction tiles (kernels/common.py `tiles_for`).
Every kernel that applies dropout also compiles with the seed as a tensor the kernel loads (SEED_PTR: the form a
CUDA graph replays with a fresh seed, fastpeft.dropout.draw_seed), named "...-tensorseed...": the one extra
load must cost no spill either.
Run `python tests/test_lora_kernels_static.py` for the full report.
"""
from __future__ import annotations

import itertools
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from static_compile import compile_in_subprocesses, compile_report, static_failures  # noqa: E402

PTR_ARCHS = (80, 90)
TMA_ARCHS = (90,)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _strides(*names):
    return {n: "i32" for n in names}


# Which GEMM variants can select each size: (name, has bias, has dropout, Q stored [K, N], seed as a tensor).
FWD, BWD = ("fwd", True, False, False, False), ("bwd", False, False, True, False)
BWD_DROPOUT = ("bwd-dropout", False, True, True, False)
BWD_DROPOUT_TSEED = ("bwd-dropout-tensorseed", False, True, True, True)  # the seed loaded from a device tensor
GEMM_VARIANTS = {"decode": (FWD, BWD, BWD_DROPOUT, BWD_DROPOUT_TSEED),
                 "mid": (FWD, BWD, BWD_DROPOUT, BWD_DROPOUT_TSEED),
                 "large": (FWD, BWD), "large_dropout": (BWD_DROPOUT, BWD_DROPOUT_TSEED)}


def _gemm_entries(k, sizes, candidates):
    """(path, size, case tag, table entry): the static defaults (GEMM_CONFIGS), or the other autotuning candidates
    (GEMM_CANDIDATES less "default", which is GEMM_CONFIGS' entry), tagged size-name."""
    for path, table in k.GEMM_CONFIGS.items():
        for size in sizes:
            if not candidates:
                yield path, size, size, table[size]
                continue
            for name, entry in k.GEMM_CANDIDATES[path][size].items():
                if name != k.DEFAULT_CANDIDATE:
                    yield path, size, f"{size}-{name}", entry


def _gemm_cases(k, dt, dtype, sizes, extremes, variants_of=GEMM_VARIANTS, precision="tf32", candidates=False):
    cases = []
    label = dt + ("ieee" if precision == "ieee" else "")
    for path, size, tag, entry in _gemm_entries(k, sizes, candidates):
        cfg = k.tiles_for(entry, dtype, precision)
        kernel = "_lora_gemm_persistent_kernel" if cfg.get("PERSISTENT") else "_lora_gemm_kernel"
        chunks = sorted({k.gemm_rank_block(r, cfg) for r in k.RANK_BLOCKS})
        rank_blocks = (chunks[0], chunks[-1]) if extremes else (chunks[-1],)
        tile = {n: v for n, v in cfg.items() if n.startswith(("BLOCK_", "GROUP_"))}
        for br in rank_blocks:
            for direction, has_bias, has_dropout, q_kn, seed_ptr in variants_of[size]:
                sig = {"P": f"*{dt}", "Q": f"*{dt}", "L": f"*{dt}",
                       "RM": f"*{dt}", "BIAS": f"*{dt}", "OUT": f"*{dt}",
                       **_strides("M", "N", "K", "R", "stride_pm", "stride_pk", "stride_qk", "stride_qn",
                                  "stride_lm", "stride_lr", "stride_rr", "stride_rn", "stride_om", "stride_on",
                                  "stride_bias"),
                       "lora_scale": "fp32", "seed": "*i64" if seed_ptr else "i32", "thr": "i32"}
                ce = dict(HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, SEED_PTR=seed_ptr, EVEN_K=False,
                          DOT_PRECISION=precision,
                          USE_TMA=path == "tma", Q_KN=q_kn, BLOCK_R=br, **tile)
                for arch in TMA_ARCHS if path == "tma" else PTR_ARCHS:
                    cases.append((f"gemm-{path}-{tag}-r{br}-{direction}-{label}-sm{arch}", kernel,
                                  sig, ce, arch, cfg["num_warps"], cfg["num_stages"]))
    return cases


# The DoRA GEMM (_lora_gemm_scaled_kernel, launched by ops/dora_linear_triton.py) with its own tiles
# (SCALED_GEMM_CONFIGS), never with dropout; per size the forward with the epilogue's column scale, with and (on the
# paths that store it, STORE_PRE_PATHS) without storing the unscaled tile, and the backward with the prologue's
# scale of dY's columns. (name, has bias, COL_SCALE, STORE_PRE, Q stored [K, N])
DORA_VARIANTS = (("dorafwd", True, 1, False, False), ("dorafwd-pre", True, 1, True, False),
                 ("dorabwd", False, 2, False, True))


def _dora_gemm_cases(k, dt, dtype, extremes, precision="tf32"):
    cases = []
    label = dt + ("ieee" if precision == "ieee" else "")
    for path, table in k.SCALED_GEMM_CONFIGS.items():
        for size in table:
            cfg = k.tiles_for(table[size], dtype, precision)
            chunks = sorted({k.gemm_rank_block(r, cfg) for r in k.RANK_BLOCKS})
            tile = {n: v for n, v in cfg.items() if n.startswith(("BLOCK_", "GROUP_"))}
            for br in (chunks[0], chunks[-1]) if extremes else (chunks[-1],):
                for direction, has_bias, col_scale, store_pre, q_kn in DORA_VARIANTS:
                    if store_pre and path not in k.STORE_PRE_PATHS:
                        continue
                    sig = {"P": f"*{dt}", "Q": f"*{dt}", "L": f"*{dt}", "RM": f"*{dt}", "BIAS": f"*{dt}",
                           "OUT": f"*{dt}", "COL": "*fp32", "PRE": f"*{dt}",
                           **_strides("M", "N", "K", "R", "stride_pm", "stride_pk", "stride_qk", "stride_qn",
                                      "stride_lm", "stride_lr", "stride_rr", "stride_rn", "stride_om", "stride_on",
                                      "stride_bias", "stride_col"),
                           "lora_scale": "fp32", "seed": "i32", "thr": "i32"}
                    ce = dict(HAS_BIAS=has_bias, HAS_DROPOUT=False, SEED_PTR=False, EVEN_K=False,
                              DOT_PRECISION=precision, USE_TMA=path == "tma", Q_KN=q_kn, COL_SCALE=col_scale,
                              STORE_PRE=store_pre, BLOCK_R=br, **tile)
                    for arch in TMA_ARCHS if path == "tma" else PTR_ARCHS:
                        cases.append((f"gemm-{path}-{size}-r{br}-{direction}-{label}-sm{arch}",
                                      "_lora_gemm_scaled_kernel", sig, ce, arch, cfg["num_warps"], cfg["num_stages"]))
    return cases


def _skinny_cases(k, dt, dtype, rank_blocks, precision="tf32"):
    cases = []
    label = dt + ("ieee" if precision == "ieee" else "")
    for kind, table in k.SKINNY_CONFIGS.items():
        for path, by_rank in table.items():
            seed_forms = (False,) if kind in ("dy", "db") else (False, True)  # the dy and db kernels apply no dropout
            for br, seed_ptr in itertools.product(rank_blocks, seed_forms):
                cfg = k.tiles_for(by_rank[br], dtype, precision)
                tile = {n: v for n, v in cfg.items() if n.startswith("BLOCK_")}
                seed_type = "*i64" if seed_ptr else "i32"
                if kind == "shrink":
                    fn = "_lora_shrink_kernel"
                    sig = {"X": f"*{dt}", "A": f"*{dt}", "S": f"*{dt}",
                           **_strides("M", "K", "R", "stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_sm", "stride_sr"),
                           "seed": seed_type, "thr": "i32", "drop_scale": "fp32"}
                    ce = dict(HAS_DROPOUT=True, SEED_PTR=seed_ptr, EVEN_K=False)
                elif kind == "dy":
                    fn = "_lora_bwd_dy_kernel"
                    sig = {"DY": f"*{dt}", "B": f"*{dt}", "S": f"*{dt}", "DS_PART": "*fp32", "DB_PART": "*fp32",
                           "DBIAS_PART": "*fp32", **_strides("M", "N", "R", "n_per_split", "stride_dym", "stride_dyn",
                                                             "stride_bn", "stride_br", "stride_sm", "stride_sr"),
                           "scaling": "fp32"}
                    ce = dict(COMPUTE_DS=True, COMPUTE_DB=True, COMPUTE_DBIAS=True)
                elif kind == "db":
                    fn = "_lora_bwd_db_kernel"
                    sig = {"DY": f"*{dt}", "S": f"*{dt}", "DB_PART": "*fp32", "DBIAS_PART": "*fp32",
                           **_strides("M", "N", "R", "m_per_split", "stride_dym", "stride_dyn", "stride_sm",
                                      "stride_sr"),
                           "scaling": "fp32"}
                    ce = dict(COMPUTE_DB=True, COMPUTE_DBIAS=True)
                else:
                    fn = "_lora_bwd_da_kernel"
                    sig = {"X": f"*{dt}", "DS": "*fp32", "DA_PART": "*fp32",
                           **_strides("M", "K", "R", "m_per_split", "stride_xm", "stride_xk", "stride_dsm", "stride_dsr"),
                           "seed": seed_type, "thr": "i32", "drop_scale": "fp32"}
                    ce = dict(HAS_DROPOUT=True, SEED_PTR=seed_ptr)
                ce.update(DOT_PRECISION=precision, USE_TMA=path == "tma", BLOCK_R=br, **tile)
                for arch in TMA_ARCHS if path == "tma" else PTR_ARCHS:
                    cases.append((f"{kind}-{path}-r{br}-{label}{'-tensorseed' if seed_ptr else ''}-sm{arch}", fn, sig, ce, arch, cfg["num_warps"], cfg["num_stages"]))
    return cases


def _cases():
    """(name, kernel attribute, signature, constexprs, arch, num_warps, num_stages) for every shipped config.

    bf16: every GEMM size with the smallest and largest epilogue rank chunk (register use grows with it),
    every skinny rank block. fp32 (its own tiles, 4-byte loads), once with TF32 dots and once with "ieee"
    ones (torch's default fp32 precision: FMA dots, their own smaller reduction tiles): every GEMM size at
    the largest rank chunk, every skinny rank block. The GEMM's other autotuning candidates (GEMM_CANDIDATES:
    persistent and other tilings, which the launcher offers for 16-bit operands only): bf16, each variant of
    their size, at the largest rank chunk (the registers beside the accumulator grow with it).
    """
    from fastpeft.kernels import lora_linear as k

    return (_gemm_cases(k, "bf16", torch.bfloat16, list(GEMM_VARIANTS), extremes=True)
            + _gemm_cases(k, "bf16", torch.bfloat16, list(GEMM_VARIANTS), extremes=False, candidates=True)
            + _skinny_cases(k, "bf16", torch.bfloat16, k.RANK_BLOCKS)
            + _gemm_cases(k, "fp32", torch.float32, list(GEMM_VARIANTS), extremes=False)
            + _skinny_cases(k, "fp32", torch.float32, k.RANK_BLOCKS)
            + _gemm_cases(k, "fp32", torch.float32, list(GEMM_VARIANTS), extremes=False, precision="ieee")
            + _skinny_cases(k, "fp32", torch.float32, k.RANK_BLOCKS, "ieee")
            + _dora_gemm_cases(k, "bf16", torch.bfloat16, extremes=True)
            + _dora_gemm_cases(k, "fp32", torch.float32, extremes=False)
            + _dora_gemm_cases(k, "fp32", torch.float32, extremes=False, precision="ieee"))


def _compile(case):
    name, fn_name, sig, ce, arch, warps, stages = case
    from fastpeft.kernels import lora_linear as k

    try:
        return name, compile_report(getattr(k, fn_name), sig, ce, arch, warps, stages), None
    except Exception as exc:  # reported per case below
        return name, None, f"{type(exc).__name__}: {str(exc)[:400]}"


def compile_all(cases):
    return compile_in_subprocesses(_compile, cases)


@pytest.fixture(scope="module")
def reports():
    return compile_all(_cases())


def test_every_config_is_enumerated():
    names = [c[0] for c in _cases()]
    assert len(names) == len(set(names))
    # both paths, all three GEMM sizes, every rank block of the skinny kernels, both directions
    for must in ("gemm-tma-large_dropout-r32-bwd-dropout-bf16-sm90", "gemm-ptr-large-r32-bwd-bf16-sm80",
                 "gemm-ptr-decode-r16-fwd-bf16-sm80",
                 "gemm-tma-large-r32-bwd-fp32-sm90", "shrink-ptr-r256-bf16-sm80", "dy-tma-r256-fp32-sm90",
                 "da-ptr-r16-bf16-sm90", "gemm-tma-large-r8-fwd-fp32ieee-sm90",
                 "gemm-tma-large_dropout-r32-bwd-dropout-tensorseed-bf16-sm90",
                 "gemm-ptr-decode-r8-bwd-dropout-tensorseed-fp32ieee-sm80", "shrink-tma-r256-bf16-tensorseed-sm90",
                 "da-ptr-r16-fp32ieee-tensorseed-sm80",
                 "gemm-tma-large-r32-dorafwd-pre-bf16-sm90", "gemm-ptr-large-r32-dorabwd-bf16-sm80",
                 "gemm-ptr-mid-r32-dorafwd-bf16-sm90",
                 "gemm-ptr-decode-r8-dorafwd-fp32ieee-sm80",
                 "gemm-ptr-mid-r8-bwd-dropout-fp32ieee-sm80", "dy-tma-r256-fp32ieee-sm90", "da-ptr-r256-fp32ieee-sm80",
                 "db-tma-r128-bf16-sm90", "db-ptr-r16-fp32ieee-sm80",
                 # the GEMM's autotuning candidates (bf16 only)
                 "gemm-tma-large-persistent-r32-fwd-bf16-sm90", "gemm-tma-mid-persistent-r64-bwd-dropout-bf16-sm90",
                 "gemm-tma-large_dropout-persistent-r32-bwd-dropout-tensorseed-bf16-sm90",
                 "gemm-ptr-large-k32s4-r32-bwd-bf16-sm80"):
        assert must in names
    # every fp32 case also at "ieee", the precision the launchers pass under torch's default 'highest'
    # (GEMMs at their own rank chunk)
    def shape(n, label):
        return re.sub(r"^(gemm-\w+-\w+)-r\d+-", r"\1-", n).replace(f"-{label}-", "-")
    assert ({shape(n, "fp32ieee") for n in names if "-fp32ieee-" in n}
            == {shape(n, "fp32") for n in names if "-fp32-" in n})


def test_compiles_without_spills_and_with_tensor_cores(reports):
    failures = static_failures(reports)
    assert not failures, "\n".join(failures)


def test_hopper_tma_gemm_uses_warpgroup_mma(reports):
    by_name = {name: rep for name, rep, _ in reports}
    names = ["gemm-tma-large-r32-fwd-bf16-sm90", "gemm-tma-large-r32-dorafwd-pre-bf16-sm90",
             "gemm-tma-large-r32-dorabwd-bf16-sm90"]
    # every autotuning candidate of the "tma" path with warpgroup-sized row tiles (the decode tiles' 16 rows are
    # below a warpgroup MMA's 64: those take mma.sync)
    from fastpeft.kernels import lora_linear as k

    names += [n for n in by_name if any(
        n.startswith(f"gemm-tma-{size}-{cand}-r") for size, cands in k.GEMM_CANDIDATES["tma"].items()
        for cand, cfg in cands.items() if cfg["BLOCK_M"] >= 64 and cand != k.DEFAULT_CANDIDATE)]
    assert any("persistent" in n for n in names)
    for name in names:
        rep = by_name[name]
        assert rep is not None and rep["hgmma"] > 0, (name, rep)


def test_launchers_pick_the_compiled_tiles(monkeypatch):
    """On a GPU the launchers resolve their tables at the dot precision they pass to tl.dot: fp32 under torch's
    default 'highest' takes the "ieee" tiles compiled above, under 'high' the TF32 ones; 16-bit ignores it."""
    from fastpeft.kernels import lora_linear_configs as kc

    monkeypatch.setattr(kc, "interpreting", lambda: False)
    saved = torch.get_float32_matmul_precision()
    try:
        for mode, precision in (("highest", "ieee"), ("high", "tf32")):
            torch.set_float32_matmul_precision(mode)
            for dtype in (torch.float32, torch.bfloat16):
                for path, table in kc.GEMM_CONFIGS.items():
                    for M, dropout in ((1, True), (100, False), (1000, False), (1000, True)):
                        expected = kc.tiles_for(table[kc.gemm_config_name(M, dropout)], dtype, precision)
                        assert kc.gemm_config(M, dtype, path, dropout) == expected
                        if dtype == torch.float32 and precision == "ieee":  # FMA dots: the smallest K tile
                            assert expected["BLOCK_K"] == expected["RANK_CHUNK"] == 8
                for kind, by_path in kc.SKINNY_CONFIGS.items():
                    for path, by_rank in by_path.items():
                        for r in (1, 17, 100, 256):
                            expected = kc.tiles_for(by_rank[kc.rank_block(r)], dtype, precision)
                            assert kc.skinny_config(kind, r, dtype, path) == expected
    finally:
        torch.set_float32_matmul_precision(saved)


def test_rank_limits_are_stated_once():
    """fastpeft/limits.py holds every op's rank limit: the kernels' config tables, the ops' backend choice and
    the CUDA extension's C++ constant (csrc/fastpeft_cuda.h kMaxRank, read as text: no build needed) agree."""
    import re

    from fastpeft import limits
    from fastpeft.kernels import adapter as ak
    from fastpeft.kernels import lora_linear as k
    from fastpeft.kernels import multi_lora as mk
    from fastpeft.ops import adapter as adapter_ops
    from fastpeft.ops import cuda_ops
    from fastpeft.ops import lora_linear as lora_ops
    from fastpeft.ops import multi_lora as multi_ops

    assert limits.LORA_MAX_RANK_TRITON == k.MAX_RANK == lora_ops.MAX_TRITON_RANK == max(k.RANK_BLOCKS)
    for table in k.SKINNY_CONFIGS.values():
        for by_rank in table.values():
            assert set(by_rank) == set(k.RANK_BLOCKS)
    assert limits.MULTI_LORA_MAX_RANK_TRITON == mk.MAX_RANK == multi_ops.MAX_TRITON_RANK
    assert mk.rank_bucket(mk.MAX_RANK) == max(mk.SKINNY_CONFIGS["dy"]) == mk.MAX_RANK
    assert limits.ADAPTER_MAX_BOTTLENECK_TRITON == ak.MAX_BOTTLENECK == adapter_ops.MAX_TRITON_BOTTLENECK
    header = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "fastpeft_cuda.h")
    with open(header, encoding="utf-8") as f:
        found = re.findall(r"constexpr\s+int\s+kMaxRank\s*=\s*(\d+)\s*;", f.read())
    assert [int(v) for v in found] == [limits.LORA_MAX_RANK_CUDA] == [cuda_ops.MAX_RANK]


if __name__ == "__main__":
    for name, rep, err in compile_all(_cases()):
        print(f"{name:45s} {err or rep}", flush=True)
