"""The K loop that every GEMM kernel shares: LoRA's, multi-LoRA's and IA3's (and later DoRA's and QLoRA's).

    acc += (P[rows, :] ⊙ pro)·Q[:, cols]    over the whole reduction length K, fp32 accumulation

Legend: P [M, K] is the left operand (x in a forward, dY in a backward); Q [K, N] the right one, stored as
[N, K] (Q_KN False: a weight read as its transpose, the forward's W0ᵀ) or as [K, N] with unit stride along
N (Q_KN True: the backward's W0); pro [K] an optional scale of P's columns applied to each loaded tile in
P's dtype (HAS_PRO: IA3's input scaling x ⊙ l, as PEFT rounds it); off_m / off_n the tile's first row /
column; rows / cols its row and column indices wrapped into bounds (int64), which the pointer path needs.

Each operand moves through a tensor descriptor (P_DESC / Q_DESC: TMA on Hopper and newer; no address
registers, zero fill past the matrix edges, so no masks) or through pointer tiles, whose wrapped rows and
columns keep every load in bounds: only K needs a mask, and only when K is not a multiple of BLOCK_K
(EVEN_K). The caller owns the prologue before the loop (the accumulator may already hold a low-rank term
or a bias) and the epilogue after it. Being a @triton.jit helper, it is inlined into each kernel: the
compiled code is the kernel's own, which is what tests/test_*static* check (spills, tensor cores).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemm_k_loop(
    acc, P, Q, PRO, rows, cols, M, N, K, off_m, off_n,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_pro,
    P_DESC: tl.constexpr, Q_DESC: tl.constexpr, Q_KN: tl.constexpr, HAS_PRO: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + (P[rows, :] ⊙ pro)·Q[:, cols] as an fp32 [BLOCK_M, BLOCK_N] tile (see the module docstring)."""
    offs_k = tl.arange(0, BLOCK_K)
    if P_DESC:
        p_desc = tl.make_tensor_descriptor(P, shape=[M, K], strides=[stride_pm, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        p_ptrs = P + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk
    if Q_DESC:
        if Q_KN:
            q_desc = tl.make_tensor_descriptor(Q, shape=[K, N], strides=[stride_qk, 1], block_shape=[BLOCK_K, BLOCK_N])
        else:
            q_desc = tl.make_tensor_descriptor(Q, shape=[N, K], strides=[stride_qn, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        q_ptrs = Q + offs_k[:, None] * stride_qk + cols[None, :] * stride_qn
    for k0 in range(0, K, BLOCK_K):
        if P_DESC:
            p = p_desc.load([off_m, k0])
        elif EVEN_K:
            p = tl.load(p_ptrs)
        else:
            p = tl.load(p_ptrs, mask=(offs_k < K - k0)[None, :], other=0.0)
        if Q_DESC:
            if Q_KN:
                q = q_desc.load([k0, off_n])
            else:
                q = q_desc.load([off_n, k0]).T
        elif EVEN_K:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=(offs_k < K - k0)[:, None], other=0.0)
        if HAS_PRO:  # P's columns past K load as 0 (mask or zero fill), so the scale's tail never matters
            if EVEN_K:
                pro = tl.load(PRO + (k0 + offs_k) * stride_pro)
            else:
                pro = tl.load(PRO + (k0 + offs_k) * stride_pro, mask=offs_k < K - k0, other=0.0)
            p = (p.to(tl.float32) * pro.to(tl.float32)[None, :]).to(P.dtype.element_ty)
        acc = tl.dot(p, q, acc, input_precision=DOT_PRECISION)
        if not P_DESC:
            p_ptrs += BLOCK_K * stride_pk
        if not Q_DESC:
            q_ptrs += BLOCK_K * stride_qk
    return acc
