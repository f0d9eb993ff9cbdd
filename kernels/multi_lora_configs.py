"""Tile configurations of the multi-adapter LoRA kernels (kernels/multi_lora.py): what each launcher may pick.

Every configuration a launcher can pick is listed here (GEMM_CANDIDATES: the GEMM's measured set); tests/test_multi_lora_static.py compiles each one for
sm_90 and sm_80 and requires no spills and tensor cores (fp32 at "ieee": none, kernels/common.py `tiles_for`).
GEMM "tma": W0 through a tensor descriptor (Hopper, 16-byte aligned W0); x / dY / y move through pointers,
so the large tile stays at 128x128 (128x256 pointer tiles spill). The per-adapter epilogue loop keeps more
state live than the single-adapter GEMM's: smaller rank chunks and 8 warps are what compile without spills.
"""
from __future__ import annotations

import functools

import torch

from ..limits import MULTI_LORA_MAX_RANK_TRITON
from .common import dot_precision, interpreting, rank_block, tiles_for
from .gemm_tuning import resolve_candidates

MAX_RANK = MULTI_LORA_MAX_RANK_TRITON  # fastpeft/limits.py; larger pools take the PyTorch backend
DECODE_M = 64  # up to this many tokens: no sort, BGMV-style tiles (each row its own adapter)


GEMM_CONFIGS = {
    "tma": {
        "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, RANK_CHUNK=64, num_warps=4, num_stages=4),
        "mid": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=4),
        "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=16, num_warps=8, num_stages=3,
                      ieee=dict(BLOCK_N=64)),
    },
    "ptr": {
        "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, RANK_CHUNK=32, num_warps=4, num_stages=3),
        "mid": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=3),
        "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=16, num_warps=8, num_stages=3,
                      ieee=dict(BLOCK_N=64)),
    },
}
# What multi_lora_gemm times per size on a GPU (kernels/gemm_tuning.py; FASTPEFT_AUTOTUNE=0: "default", the
# entry above, the static default). 16-bit operands only: fp32 keeps "default", so
# tests/test_multi_lora_static.py compiles the other candidates for bf16 alone. Why these (no GPU has measured
# them yet; 132 SMs on H100/H200):
#   decode: 16-row tiles keep the per-adapter epilogue's dots short (per-token ids: up to 16 adapters a tile);
#     W0 streams once, and 64 columns give N/64 programs (64 at N = 4096): 32 columns and a longer K tile
#     double them and keep the bytes in flight.
#   mid: at most 4 row tiles, so the column tiles set the parallelism: 128 columns give 128 programs at
#     M = 256, N = 4096 (under one wave), 64 columns 256 (8 warps: at 4 the backward's epilogue spills).
#   large: x and y move through pointers, so 128x128 is the widest tile without spills; a 4th stage (tma) or
#     K-32 with 4 stages (ptr, the classic Ampere shape) hides more of the pointer loads' latency.
GEMM_CANDIDATES = {
    "tma": {
        "decode": {"default": GEMM_CONFIGS["tma"]["decode"],
                   "n32": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=4, RANK_CHUNK=64, num_warps=4,
                               num_stages=4)},
        "mid": {"default": GEMM_CONFIGS["tma"]["mid"],
                "n64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8,
                            num_stages=4)},
        "large": {"default": GEMM_CONFIGS["tma"]["large"],
                  "s4": dict(GEMM_CONFIGS["tma"]["large"], num_stages=4)},
    },
    "ptr": {
        "decode": {"default": GEMM_CONFIGS["ptr"]["decode"]},
        "mid": {"default": GEMM_CONFIGS["ptr"]["mid"]},
        "large": {"default": GEMM_CONFIGS["ptr"]["large"],
                  "k32s4": dict(GEMM_CONFIGS["ptr"]["large"], BLOCK_K=32, num_stages=4)},
    },
}
# _multi_lora_gemm_kernel without its K loop (HAS_BASE=False: the cuBLAS backend's C, memory-bound): one
# [BLOCK_M, BLOCK_N] output tile per program, 16 rows for decode (a tile then spans few adapters), 64 beyond.
# BLOCK_K is unused (no K loop) but a kernel argument.
EXPAND_CONFIGS = {
    "decode": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=16, GROUP_M=1, RANK_CHUNK=32, num_warps=4, num_stages=1),
    "tile": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=1,
                 ieee=dict(BLOCK_N=64)),
}
# Skinny kernels by padded rank (pointer loads only, so one table for both architectures). dy and red share
# BLOCK_M: it is the segment-tile size of the backward's per-adapter grouping. "ieee" (fp32 FMA dots, see
# kernels/common.py `tiles_for`): the reduction tile of the shrink (K) and of dS (dY's columns) shrinks.
SEG_BLOCK_M = 64
SKINNY_CONFIGS = {
    "shrink": {64: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3, ieee=dict(BLOCK_K=8)),
               128: dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=3, ieee=dict(BLOCK_K=8))},
    "dy": {64: dict(BLOCK_M=SEG_BLOCK_M, BLOCK_N=32, num_warps=8, num_stages=3, ieee=dict(BLOCK_N=8)),
           128: dict(BLOCK_M=SEG_BLOCK_M, BLOCK_N=16, num_warps=8, num_stages=3, ieee=dict(BLOCK_N=8))},
    # _multi_lora_seg_reduce_kernel (dB over dY's columns, dA over x's): a [BLOCK_D, r] fp32 accumulator kept
    # over each adapter's run of segment tiles. Its two inlined flushes (stores to the output or a partial slot)
    # and the gathered [SEG_BLOCK_M, r] operand hold many registers: 32 columns at 8 warps reach 203 registers at
    # r64 and spill at r128, 64 columns spill at both; 16 columns compile clean (GPU tuning owed: e.g. reducing
    # the segment tile in row chunks to afford wider column tiles)
    "red": {64: dict(BLOCK_M=SEG_BLOCK_M, BLOCK_D=16, num_warps=8, num_stages=3),
            128: dict(BLOCK_M=SEG_BLOCK_M, BLOCK_D=16, num_warps=8, num_stages=3)},
    "fixup": {64: dict(BLOCK_D=64, num_warps=4, num_stages=1),
              128: dict(BLOCK_D=32, num_warps=4, num_stages=1)},
}
INTERPRETER_SEG_BLOCK_M = 16
INTERPRETER_CONFIGS = {
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, RANK_CHUNK=16, num_warps=4, num_stages=1),
    "shrink": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1),
    "dy": dict(BLOCK_M=INTERPRETER_SEG_BLOCK_M, BLOCK_N=32, num_warps=4, num_stages=1),
    "red": dict(BLOCK_M=INTERPRETER_SEG_BLOCK_M, BLOCK_D=32, num_warps=4, num_stages=1),
    "fixup": dict(BLOCK_D=32, num_warps=4, num_stages=1),
}


def rank_bucket(r_max: int) -> int:
    """The skinny-kernel table row of a pool whose largest rank is r_max (<= MAX_RANK)."""
    return 64 if r_max <= 64 else 128


def gemm_config_name(M: int) -> str:
    return "decode" if M <= DECODE_M else "mid" if M <= 256 else "large"


def gemm_rank_block(r_max: int, cfg: dict) -> int:
    """Rank chunk of the GEMM's low-rank epilogue: RANK_CHUNK bounds the operand tiles beside the accumulator."""
    return min(rank_block(r_max), cfg["RANK_CHUNK"])


def gemm_config(M: int, dtype: torch.dtype, path: str) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIGS["gemm"])
    return tiles_for(GEMM_CONFIGS[path][gemm_config_name(M)], dtype)


@functools.lru_cache(maxsize=None)
def _resolved_candidates(path: str, size: str, dtype: torch.dtype, precision: str) -> dict:
    return resolve_candidates(GEMM_CANDIDATES[path][size], dtype, precision)


def gemm_candidates(M: int, dtype: torch.dtype, path: str) -> dict:
    """{name: resolved config} multi_lora_gemm may time (GEMM_CANDIDATES; fp32: "default" alone), the static
    default under DEFAULT_CANDIDATE. Cached and shared: callers must not modify the configs."""
    return _resolved_candidates(path, gemm_config_name(M), dtype, dot_precision(dtype))


def expand_config_name(M: int) -> str:
    return "decode" if M <= DECODE_M else "tile"


def expand_config(M: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIGS["gemm"])
    return tiles_for(EXPAND_CONFIGS[expand_config_name(M)], dtype)


def skinny_config(kind: str, r_max: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIGS[kind])
    cfg = SKINNY_CONFIGS[kind][rank_bucket(r_max)]
    return cfg if kind == "fixup" else tiles_for(cfg, dtype)


def seg_block_m() -> int:
    return INTERPRETER_SEG_BLOCK_M if interpreting() else SEG_BLOCK_M
