"""The skinny kernel of the cuBLAS backend (fastpeft/ops/lora_linear_cublas.py): the low-rank term written once,
as the C input of cuBLAS's GEMM (torch.addmm(C, P, Q) reads C once, in its epilogue).

  _lora_expand_kernel   OUT = c·keep⊙(L·Rm) + bias          forward:  L=S,  Rm=Bᵀ, c=s,        bias: the layer's
                                                              backward: L=dS, Rm=A,  c=1/(1-p),  keep: the forward's
                                                                        mask, regenerated from the seed

OUT [M, N] is stored in OUT's dtype (the GEMM's: x's, or dY's); the product accumulates in fp32 over rank
chunks of BLOCK_R, both factors cast to OUT's dtype first, as the fused GEMM does (kernels/lora_linear.py), so
the two backends round the same way. One program per [BLOCK_M, BLOCK_N] tile of OUT: a memory-bound pass that
writes OUT once and reads L and Rm (r columns each) from L2.

Argument legend: L [M, R] and RM [R, N] the low-rank factors (RM read through its strides: Bᵀ or A as given);
c = scale; thr the dropout threshold (kernels/philox.py); the seed an int, or with SEED_PTR a 0-d int64 tensor
the kernel loads (CUDA graphs). stride_<t><d> is tensor t's stride along dimension d.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, fma_dots, interpreting, launch_opts, rank_block, tile_args
from .launch import _launch, seed_arg  # the launch helper that also loads the tensor-seed variant (CUDA graphs)
from .lowrank_tile import lowrank_tile

# Tiles by dtype class. The pass streams OUT; the rank chunk bounds the [BLOCK_M, BLOCK_R] and [BLOCK_R, BLOCK_N]
# operand tiles beside the fp32 accumulator. Dropout adds the Philox state of a [BLOCK_M, BLOCK_N / 4] counter
# tile, so its variant takes more warps. "ieee": fp32 with full-precision (FMA) dots, whose operands sit in
# registers over the whole reduction chunk: a smaller chunk and column tile.
EXPAND_CONFIGS = {
    "16bit": dict(BLOCK_M=64, BLOCK_N=128, RANK_CHUNK=32, num_warps=4, num_stages=2),
    "16bit_dropout": dict(BLOCK_M=64, BLOCK_N=128, RANK_CHUNK=32, num_warps=8, num_stages=2),
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, RANK_CHUNK=32, num_warps=4, num_stages=2),
    "fp32_dropout": dict(BLOCK_M=64, BLOCK_N=64, RANK_CHUNK=32, num_warps=8, num_stages=2),
    "ieee": dict(BLOCK_M=32, BLOCK_N=64, RANK_CHUNK=16, num_warps=4, num_stages=1),
    "ieee_dropout": dict(BLOCK_M=32, BLOCK_N=64, RANK_CHUNK=16, num_warps=8, num_stages=1),
}
# Under the interpreter: small tiles so odd test shapes span several partial tiles and rank chunks.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, RANK_CHUNK=16, num_warps=4, num_stages=1)


def expand_config_name(dtype: torch.dtype, dropout: bool, precision: str | None = None) -> str:
    if dtype == torch.float32:
        base = "ieee" if fma_dots(dtype, precision) else "fp32"
    else:
        base = "16bit"
    return base + ("_dropout" if dropout else "")


def expand_config(dtype: torch.dtype, dropout: bool) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    return dict(EXPAND_CONFIGS[expand_config_name(dtype, dropout)])


def expand_rank_block(r: int, cfg: dict) -> int:
    return min(rank_block(r), cfg["RANK_CHUNK"])


@triton.jit
def _lora_expand_body(
    L, RM, BIAS, OUT, M, N, R,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias,
    scale, seed, thr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MASK=None, stride_mask=0, PACKED: tl.constexpr = False,
):
    """_lora_expand_kernel, and with PACKED (_lora_expand_packed_kernel) the keep-mask read from the bits MASK."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrapped rows/columns keep the loads in bounds without masks; the store drops them
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    acc = lowrank_tile(L, RM, OUT, rows, cols, offs_m, pid_n * BLOCK_N, N, R, stride_lm, stride_lr, stride_rr,
                       stride_rn, scale, seed, thr, MASK, stride_mask, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR,
                       PACKED=PACKED, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                       BLOCK_R=BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_expand_kernel(
    L, RM, BIAS, OUT, M, N, R,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias,
    scale, seed, thr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    _lora_expand_body(L, RM, BIAS, OUT, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
                      stride_bias, scale, seed, thr, HAS_BIAS=HAS_BIAS, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR,
                      DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)


@triton.jit
def _lora_expand_packed_kernel(
    L, RM, BIAS, OUT, MASK, M, N, R,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, stride_mask,
    scale,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    _lora_expand_body(L, RM, BIAS, OUT, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
                      stride_bias, scale, 0, 0, HAS_BIAS=HAS_BIAS, HAS_DROPOUT=True, SEED_PTR=False,
                      DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
                      MASK=MASK, stride_mask=stride_mask, PACKED=True)


def lora_expand(l_mat: torch.Tensor, rm_t: torch.Tensor, bias, scale: float, dtype: torch.dtype,
                dropout: tuple | None = None, mask=None) -> torch.Tensor:
    """OUT = scale·keep⊙(L·Rm) + bias as a fresh row-major [M, N] tensor of `dtype`, where rm_t = Rmᵀ [N, R].

    Every tensor may have any strides (bias [N] included). dropout: (seed, thr), the seed an int or a 0-d int64
    tensor on L's device, to apply the keep-mask of rows M and columns N (the mask of x [M, N] drawn from that
    seed: fastpeft.dropout), or None. mask (with dropout): that keep-mask as packed bits, uint8 [M, ceil(N/8)]
    with unit column stride (dropout_mask="packed"), read instead of regenerated."""
    M, R = l_mat.shape
    N = rm_t.shape[0]
    out = torch.empty((M, N), device=l_mat.device, dtype=dtype)
    if M == 0 or N == 0:
        return out
    cfg = expand_config(dtype, dropout is not None)
    seed, thr = dropout if dropout is not None else (0, 0)
    seed, seed_ptr = seed_arg(seed, l_mat.device) if dropout is not None else (0, False)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    bias_t = bias if bias is not None else out
    strides = (l_mat.stride(0), l_mat.stride(1), rm_t.stride(1), rm_t.stride(0), out.stride(0), out.stride(1),
               bias.stride(0) if bias is not None else 0)
    consts = dict(HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(dtype), BLOCK_R=expand_rank_block(R, cfg),
                  **tile_args(cfg), **launch_opts(cfg))
    if dropout is not None and mask is not None:  # dropout_mask="packed": the keep bits read, no seed
        _lora_expand_packed_kernel[grid](l_mat, rm_t, bias_t, out, mask, M, N, R, *strides, mask.stride(0), scale,
                                         **consts)
        return out
    _launch(_lora_expand_kernel, grid, l_mat, rm_t, bias_t, out, M, N, R, *strides, scale, seed=seed, thr=thr,
            HAS_DROPOUT=dropout is not None, SEED_PTR=seed_ptr, **consts)
    return out
