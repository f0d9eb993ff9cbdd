"""The low-rank term of one output tile, shared by the LoRA GEMM's prologue (kernels/lora_linear.py
`_lora_gemm_tile`) and the cuBLAS path's expand kernel (kernels/lora_skinny.py):

    c·keep⊙(L[rows, :]·Rm[:, cols])    fp32 [BLOCK_M, BLOCK_N], L·Rm in rank chunks of BLOCK_R

Both factors are cast to TYPED's element type before the dot (the GEMM's operand dtype), so every backend rounds
the same way. keep: none (HAS_DROPOUT False), the mask regenerated from the seed (dropout_keep), or read from the
packed bits MASK (PACKED, dropout_mask="packed"). rows / cols are the tile's indices wrapped into bounds (int64);
offs_m the unwrapped row indices (the mask's rows), col0 the tile's first column. A @triton.jit helper: inlined,
so the compiled code is each kernel's own (the static tests check the kernels).
"""
import triton
import triton.language as tl

from .philox import dropout_keep, dropout_seed, load_keep_bits


@triton.jit
def lowrank_tile(
    L, RM, TYPED, rows, cols, offs_m, col0, N, R, stride_lm, stride_lr, stride_rr, stride_rn, scale, seed, thr,
    MASK, stride_mask,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_mask = offs_r < R - r0
        lo = tl.load(L + rows[:, None] * stride_lm + (r0 + offs_r[None, :]) * stride_lr, mask=r_mask[None, :], other=0.0)
        rm = tl.load(RM + (r0 + offs_r[:, None]) * stride_rr + cols[None, :] * stride_rn, mask=r_mask[:, None], other=0.0)
        acc = tl.dot(lo.to(TYPED.dtype.element_ty), rm.to(TYPED.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    acc = acc * scale
    if HAS_DROPOUT:
        if PACKED:
            keep = load_keep_bits(MASK, stride_mask, rows, col0, N, BLOCK_M, BLOCK_N)
        else:
            keep = dropout_keep(dropout_seed(seed, SEED_PTR), offs_m, col0, thr, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc, 0.0)
    return acc
