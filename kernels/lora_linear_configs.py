"""Tile configurations of the LoRA linear kernels (kernels/lora_linear.py): what each launcher may pick.

Every configuration a launcher can pick is listed here; tests/test_lora_kernels_static.py compiles each one
(sm_90 for the "tma" path, sm_80 and sm_90 for "ptr") and requires no spills and tensor cores (fp32 at
"ieee": none, see kernels/common.py `tiles_for`).
"tma": Hopper and newer with 16-byte aligned rows: x, dY, W0 and y move through tensor descriptors.
"ptr": everything else (Ampere, odd strides): pointer tensors, which cost registers, so smaller tiles.
The GEMM's tables hold its static defaults; GEMM_CANDIDATES the sets it times on a GPU (kernels/lora_gemm_tuning.py).
"""
from __future__ import annotations

import functools

import torch

from ..limits import LORA_MAX_RANK_TRITON
from .common import dot_precision, interpreting, rank_block, tiles_for
from .gemm_tuning import DEFAULT_CANDIDATE, resolve_candidates  # noqa: F401 (DEFAULT_CANDIDATE re-exported)

MAX_RANK = LORA_MAX_RANK_TRITON  # fastpeft/limits.py; larger ranks take the PyTorch backend

RANK_BLOCKS = (16, 32, 64, 128, 256)

# GEMM tiles by token count. The low-rank term runs in rank chunks (gemm_rank_block) before the main loop.
GEMM_CONFIGS = {
    "tma": {
        "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, RANK_CHUNK=64, num_warps=4, num_stages=4),
        "mid": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=64, num_warps=4, num_stages=4),
        "large": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=3),
        # backward with dropout: the Philox words of a 128x256 tile beside its accumulator spill
        "large_dropout": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=4),
    },
    "ptr": {
        "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, RANK_CHUNK=32, num_warps=4, num_stages=3),
        "mid": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=4, num_stages=3),
        "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=3),
        "large_dropout": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=3,
                              fp32=dict(BLOCK_N=64, BLOCK_K=32)),
    },
}
# What the launcher times per M bucket on a GPU (kernels/lora_gemm_tuning.py; FASTPEFT_AUTOTUNE=0: "default",
# the entry above, which stays the static default). PERSISTENT: _lora_gemm_persistent_kernel, about one program
# per SM looping over the tiles. 16-bit operands only: fp32 (its own halved tiles, TF32 or FMA dots) keeps
# "default", so tests/test_lora_kernels_static.py compiles the other candidates for bf16 (the register and
# shared-memory layouts of fp16) alone. Why these (no GPU has measured them yet):
#   decode: W0 streams once; 64-column tiles give only N/64 programs (64 at N = 4096 on 132 SMs), 32 columns twice
#     as many, a longer K tile keeps the bytes in flight.
#   mid: M <= 256 is a few row tiles, so the column tiles set the parallelism: 64 columns double the programs;
#     persistent for the wide MLP projections (N = 11008: 344 tiles, 2.6 waves).
#   large: the persistent grid removes the tail wave's launch and keeps a wave's W0 tiles in L2; 128x128 (as with
#     dropout: 4 stages) for shapes whose 128x256 tiles leave a ragged last wave (M*N/32768 just above a
#     multiple of the SM count); and both together.
# No warp-specialized candidates: Triton 3.9 ignores warp_specialize on sm_90 for the persistent tile loop and, on
# the K loop, ignores it at 8 warps and aborts the compiler (LLVM ERROR) at 4 (kernels/lora_gemm_tuning.py).
# "ptr" (Ampere, unaligned rows): the pointer tiles' registers leave little room; one K-32, 4-stage variant of
# the large tile (the classic Ampere shape), the rest the default alone.
GEMM_CANDIDATES = {
    "tma": {
        "decode": {"default": GEMM_CONFIGS["tma"]["decode"],
                   "n32": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, RANK_CHUNK=64, num_warps=4,
                               num_stages=4)},
        "mid": {"default": GEMM_CONFIGS["tma"]["mid"],
                "n64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=64, num_warps=4, num_stages=5),
                "persistent": dict(GEMM_CONFIGS["tma"]["mid"], PERSISTENT=True)},
        "large": {"default": GEMM_CONFIGS["tma"]["large"],
                  "persistent": dict(GEMM_CONFIGS["tma"]["large"], PERSISTENT=True),
                  "128x128": GEMM_CONFIGS["tma"]["large_dropout"],
                  "128x128-persistent": dict(GEMM_CONFIGS["tma"]["large_dropout"], PERSISTENT=True)},
        "large_dropout": {"default": GEMM_CONFIGS["tma"]["large_dropout"],
                          "persistent": dict(GEMM_CONFIGS["tma"]["large_dropout"], PERSISTENT=True)},
    },
    "ptr": {
        "decode": {"default": GEMM_CONFIGS["ptr"]["decode"]},
        "mid": {"default": GEMM_CONFIGS["ptr"]["mid"]},
        "large": {"default": GEMM_CONFIGS["ptr"]["large"],
                  "k32s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, RANK_CHUNK=32, num_warps=8,
                                num_stages=4)},
        "large_dropout": {"default": GEMM_CONFIGS["ptr"]["large_dropout"]},
    },
}

# The DoRA GEMM (_lora_gemm_scaled_kernel): the LoRA GEMM's tiles, except where the per-column scale's registers
# beside the bias's spill: Hopper's large tile narrows to 128 columns (as with dropout), the pointer path's mid tile
# takes 8 warps. Its store of the unscaled tile (STORE_PRE) is compiled for the "tma" path only: beside the pointer
# path's address tensors it spills, so there the launcher stores the unscaled product and scales it in PyTorch.
SCALED_GEMM_CONFIGS = {
    "tma": {
        "decode": GEMM_CONFIGS["tma"]["decode"],
        "mid": GEMM_CONFIGS["tma"]["mid"],
        "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=4),
    },
    "ptr": {
        "decode": GEMM_CONFIGS["ptr"]["decode"],
        "mid": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=3),
        "large": GEMM_CONFIGS["ptr"]["large"],
    },
}
STORE_PRE_PATHS = ("tma",)
# Skinny kernels by padded rank: the [BLOCK_M, r] accumulators bound the row block. "ieee": fp32 with
# full-precision (FMA) dots, whose operands take registers over the whole reduction tile (`tiles_for`):
# dY's column tile (dy: the reduction of dS) and the row tile (da: the reduction of dA) shrink.
SKINNY_CONFIGS = {
    "shrink": {
        "tma": {16: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4),
                32: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4),
                64: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4),
                128: dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3),
                256: dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=3)},
        "ptr": {16: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3, fp32=dict(BLOCK_K=64)),
                32: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3, fp32=dict(BLOCK_K=64)),
                64: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
                128: dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=3),
                256: dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=3)},
    },
    "dy": {
        "tma": {16: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, ieee=dict(BLOCK_N=8)),
                32: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, ieee=dict(BLOCK_N=8)),
                64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, ieee=dict(BLOCK_N=8)),
                128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3, ieee=dict(BLOCK_N=8)),
                256: dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=3, ieee=dict(BLOCK_N=8))},
        "ptr": {16: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, ieee=dict(BLOCK_N=16)),
                32: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, ieee=dict(BLOCK_N=16)),
                64: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=3, ieee=dict(BLOCK_N=16)),
                128: dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=3, ieee=dict(BLOCK_N=16)),
                256: dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=3, fp32=dict(BLOCK_N=16),
                      ieee=dict(BLOCK_N=16))},
    },
    # _lora_bwd_db_kernel (dB and dbias over a share of the rows, for many row blocks): the [BLOCK_N, r] fp32
    # accumulator stays in registers over the rows; BLOCK_M is the dots' reduction tile ("ieee": FMA dots hold
    # it in registers, so it shrinks)
    "db": {
        "tma": {16: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, ieee=dict(BLOCK_M=16)),
                32: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, ieee=dict(BLOCK_M=16)),
                64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, ieee=dict(BLOCK_M=16)),
                128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3, ieee=dict(BLOCK_M=16)),
                256: dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3, ieee=dict(BLOCK_M=8))},
        "ptr": {16: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, ieee=dict(BLOCK_M=16)),
                32: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, ieee=dict(BLOCK_M=16)),
                64: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, ieee=dict(BLOCK_M=16)),
                128: dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3, ieee=dict(BLOCK_M=16)),
                256: dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=3, ieee=dict(BLOCK_M=8))},
    },
    "da": {
        "tma": {16: dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
                32: dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
                64: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
                128: dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3),
                256: dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=3)},
        "ptr": {16: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
                32: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
                64: dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=3),
                128: dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=3),
                256: dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=3, ieee=dict(BLOCK_M=8))},
    },
}
# Under the interpreter: one small config per kernel, so odd test shapes span several partial tiles.
INTERPRETER_CONFIGS = {
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, RANK_CHUNK=16, num_warps=4, num_stages=1),
    "gemm_persistent": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, RANK_CHUNK=16, num_warps=4,
                            num_stages=1, PERSISTENT=True),
    "shrink": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1),
    "dy": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
    "da": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1),
    "db": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
}


def gemm_config_name(M: int, dropout: bool) -> str:
    if M <= 16:
        return "decode"
    if M <= 256:
        return "mid"
    return "large_dropout" if dropout else "large"


def gemm_config(M: int, dtype: torch.dtype, path: str, dropout: bool) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIGS["gemm"])
    return tiles_for(GEMM_CONFIGS[path][gemm_config_name(M, dropout)], dtype)


@functools.lru_cache(maxsize=None)
def _resolved_candidates(path: str, size: str, dtype: torch.dtype, precision: str) -> dict:
    return resolve_candidates(GEMM_CANDIDATES[path][size], dtype, precision)


def gemm_candidates(M: int, dtype: torch.dtype, path: str, dropout: bool) -> dict:
    """{name: resolved config} the launcher may time for this GEMM (GEMM_CANDIDATES; fp32: "default" alone), the
    static default under DEFAULT_CANDIDATE. Cached and shared: callers must not modify the configs."""
    return _resolved_candidates(path, gemm_config_name(M, dropout), dtype, dot_precision(dtype))


def scaled_gemm_config(M: int, dtype: torch.dtype, path: str) -> dict:
    """Tiles of the DoRA GEMM (never with dropout)."""
    if interpreting():
        return dict(INTERPRETER_CONFIGS["gemm"])
    return tiles_for(SCALED_GEMM_CONFIGS[path][gemm_config_name(M, False)], dtype)


def skinny_config(kind: str, r: int, dtype: torch.dtype, path: str) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIGS[kind])
    return tiles_for(SKINNY_CONFIGS[kind][path][rank_block(r)], dtype)


def gemm_rank_block(r: int, cfg: dict) -> int:
    """Rank chunk of the GEMM's low-rank term: the config's RANK_CHUNK bounds the [BLOCK_M, chunk] and
    [chunk, BLOCK_N] operand tiles that sit in registers beside the accumulator."""
    return min(rank_block(r), cfg["RANK_CHUNK"])
