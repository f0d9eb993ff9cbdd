"""Fused LoRA linear: y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, forward and backward, never forming B·A.

Kernels (x [M, K], W0 [N, K], A [R, K], B [N, R]):
  _lora_shrink_kernel   S = dropout(x)·Aᵀ                      one read of x, mask from the seed
  _lora_gemm_kernel     out = P·Q + c·keep⊙(L·Rm) + bias         forward:  P=x,  Q=W0ᵀ, L=S,  Rm=Bᵀ, c=s
                                                                 backward: P=dY, Q=W0,  L=dS, Rm=A,  c=1/(1-p)
  _lora_gemm_scaled_kernel  the same with a per-column scale (DoRA's m/‖W0 + s·B·A‖, ops/dora_linear.py):
                        out = col⊙(P·Q + c·L·Rm) + bias (epilogue; optionally also storing the unscaled tile), or
                        out = (P⊙col)·Q + c·keep⊙(L·Rm) (prologue: dY's columns in the backward)
  _lora_bwd_dy_kernel   dS = s·dY·B, dB = s·dYᵀ·S, dbias = Σ dY   one read of dY (dB and dbias: few row blocks)
  _lora_bwd_db_kernel   dB = s·dYᵀ·S, dbias = Σ dY               a second read of dY, for many row blocks
  _lora_bwd_da_kernel   dA = dSᵀ·dropout(x)                      one read of x, mask regenerated

Reductions across programs (dB over rows, dS over column splits, dA over row splits) go to fp32 partial
buffers summed afterwards in a fixed order, so results are deterministic (no float atomics). Each runs on a
fixed number of programs along the reduced dimension (kernels/common.py `reduction_programs`): each program
loops over its share and writes one partial, so the partials take at most one output plus PARTIAL_BUDGET
bytes, whatever M. The dY kernel computes dS for a row block over its columns and dB over its rows at once, so
it writes one dB partial per row block: it does so only while those fit the budget (few row blocks);
otherwise dS comes from the dY kernel alone and dB from _lora_bwd_db_kernel, whose programs each own a column
tile and loop over a share of the rows, accumulating in registers (dY is then read twice: at M = 8192 a
second read of dY moves 64 MiB where one partial per row block would write and read 64 MiB at r = 16, 1.4 GB
at r = 128). Saved for backward: x, S and the seed only.

The seed: an int, passed as a kernel argument, or a 0-d int64 tensor on the kernels' device, which the kernels
load themselves (SEED_PTR), so nothing is read on the host and a CUDA graph replays a freshly drawn seed
(fastpeft.dropout.draw_seed). Same value, same mask.

Argument legend: P [M, K] and Q [K, N] the main product's operands (Q_KN: Q stored
[K, N], else read from Qᵀ [N, K]; the K loop is kernels/gemm_loop.py's); L [M, R] and RM [R, N] ("R
matrix", RM to keep it apart from the rank R) the low-rank factors; c = lora_scale; thr the dropout
threshold (kernels/philox.py); COL a per-column scale (COL_SCALE), PRE the unscaled output (STORE_PRE);
*_PART fp32 per-program partials; BLOCK_R the rank tile (a chunk of R in the GEMM). stride_<t><d> is tensor
t's stride along dimension d.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (  # noqa: F401 (path_for, rank_block, tiles_for: re-exported for the tests)
    dot_precision, grouped_tile, launch_opts, path_for, rank_block, reduction_programs, split_even, tile_args,
    tiles_for,
)
from . import common as _common  # PARTIAL_BUDGET, read at each launch (tests lower it)
from .gemm_loop import gemm_k_loop
from .lowrank_tile import lowrank_tile
from .launch import _launch, seed_arg  # noqa: F401 (seed_arg re-exported: fastpeft.kernels.lora_linear.seed_arg)
from .lora_decode import lora_decode
from .lora_gemm_tuning import persistent_programs, tuned_gemm_config
from .lora_linear_configs import (  # noqa: F401 (the tables, re-exported: fastpeft.kernels.lora_linear.*)
    DEFAULT_CANDIDATE, GEMM_CANDIDATES, GEMM_CONFIGS, INTERPRETER_CONFIGS, MAX_RANK, RANK_BLOCKS, SCALED_GEMM_CONFIGS,
    SKINNY_CONFIGS, STORE_PRE_PATHS, gemm_candidates, gemm_config, gemm_config_name, gemm_rank_block,
    scaled_gemm_config, skinny_config,
)
from .philox import dropout_keep, dropout_keep_and_bits, dropout_seed, load_keep_bits, store_keep_bits


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _lora_shrink_body(
    X, A, S, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    seed, thr, drop_scale,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    MASK=None, stride_mask=0, PACKED: tl.constexpr = False,
):
    """_lora_shrink_kernel, and with PACKED (_lora_shrink_packed_kernel) the keep-mask also stored as bits to MASK
    (kernels/philox.py's layout) as it is drawn."""
    pid = tl.program_id(0)
    if HAS_DROPOUT:
        key = dropout_seed(seed, SEED_PTR)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    # wrapped rows/ranks keep the loads in bounds without masks; the store drops them
    rows = (offs_m % M).to(tl.int64)
    ranks = offs_r % R
    a_ptrs = A + ranks[None, :] * stride_ar + offs_k[:, None] * stride_ak
    if USE_TMA:  # x through the tensor-memory accelerator: no address registers, zero fill past the edges
        x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < K - k0)[:, None], other=0.0)
        if USE_TMA:
            x = x_desc.load([pid * BLOCK_M, k0])
        elif EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(offs_k < K - k0)[None, :], other=0.0)
        if HAS_DROPOUT:
            if PACKED:  # the mask's bytes too, columns past K 0 (x is 0 there anyway)
                keep, bits = dropout_keep_and_bits(key, offs_m, k0, thr, K, BLOCK_M, BLOCK_K)
                store_keep_bits(MASK, stride_mask, bits, offs_m, k0, M, K, BLOCK_M, BLOCK_K)
            else:
                keep = dropout_keep(key, offs_m, k0, thr, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        acc = tl.dot(x, a.to(x.dtype), acc, input_precision=DOT_PRECISION)
        if not USE_TMA:
            x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * drop_scale
    s_ptrs = S + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(S.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_shrink_kernel(
    X, A, S, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    seed, thr, drop_scale,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    _lora_shrink_body(X, A, S, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
                      seed, thr, drop_scale, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR, EVEN_K=EVEN_K,
                      DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_shrink_packed_kernel(
    X, A, S, MASK, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr, stride_mask,
    seed, thr, drop_scale,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    _lora_shrink_body(X, A, S, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
                      seed, thr, drop_scale, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR, EVEN_K=EVEN_K,
                      DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
                      MASK=MASK, stride_mask=stride_mask, PACKED=True)


@triton.jit
def _lora_gemm_tile(
    tile, P, Q, L, RM, BIAS, OUT, COL, PRE, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    stride_bias, stride_col, lora_scale, seed, thr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, Q_KN: tl.constexpr, COL_SCALE: tl.constexpr,
    STORE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, MASK=None, stride_mask=0, PACKED: tl.constexpr = False,
):
    """Output tile number `tile` (grouped order) of _lora_gemm_kernel / _lora_gemm_scaled_kernel (one tile per
    program: tl.program_id(0)) and _lora_gemm_persistent_kernel (a loop over tiles), inlined into each: the
    compiled code is the kernel's own. COL_SCALE: 0 none; 1 the epilogue scales the output's columns by COL
    (before the bias; STORE_PRE also stores the tile before that scale to PRE); 2 the prologue scales P's columns
    (the K dimension) by COL, through gemm_loop's operand-scaling hook. PRE has OUT's shape and strides.
    PACKED (_lora_gemm_packed_kernel): the keep-mask is read from the bits MASK [M, ceil(N/8)], not regenerated."""
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    # the low-rank term first, while the accumulator is free: c·keep⊙(L·Rm), L·Rm in R-chunks
    acc = lowrank_tile(L, RM, P, rows, cols, offs_m, pid_n * BLOCK_N, N, R, stride_lm, stride_lr, stride_rr,
                       stride_rn, lora_scale, seed, thr, MASK, stride_mask, HAS_DROPOUT=HAS_DROPOUT,
                       SEED_PTR=SEED_PTR, PACKED=PACKED, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
                       BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)

    # Q_KN: Q is stored [K, N] with unit stride along N (backward's W0); else [N, K] (forward's W0)
    acc = gemm_k_loop(acc, P, Q, COL, rows, cols, M, N, K, pid_m * BLOCK_M, pid_n * BLOCK_N,
                      stride_pm, stride_pk, stride_qk, stride_qn, stride_col,
                      P_DESC=USE_TMA, Q_DESC=USE_TMA, Q_KN=Q_KN, HAS_PRO=COL_SCALE == 2, EVEN_K=EVEN_K,
                      DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)

    if COL_SCALE == 1:
        if STORE_PRE:  # the tile before its column scale (DoRA saves it for the magnitude's gradient)
            if USE_TMA:
                pre_desc = tl.make_tensor_descriptor(PRE, shape=[M, N], strides=[stride_om, 1],
                                                     block_shape=[BLOCK_M, BLOCK_N])
                pre_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(PRE.dtype.element_ty))
            else:  # the same offsets as OUT's below (PRE has OUT's strides): computed once
                pre_ptrs = PRE + (offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on)
                tl.store(pre_ptrs, acc.to(PRE.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
        acc = acc * tl.load(COL + cols * stride_col).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    if USE_TMA:
        out_desc = tl.make_tensor_descriptor(OUT, shape=[M, N], strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_N])
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(OUT.dtype.element_ty))
    else:
        out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_gemm_kernel(
    P, Q, L, RM, BIAS, OUT, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    stride_bias, lora_scale, seed, thr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, Q_KN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    _lora_gemm_tile(tl.program_id(0), P, Q, L, RM, BIAS, OUT, OUT, OUT, M, N, K, R,
                    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
                    stride_om, stride_on, stride_bias, 0, lora_scale, seed, thr,
                    HAS_BIAS=HAS_BIAS, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR, EVEN_K=EVEN_K,
                    DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA, Q_KN=Q_KN, COL_SCALE=0, STORE_PRE=False,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, GROUP_M=GROUP_M)


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_gemm_persistent_kernel(
    P, Q, L, RM, BIAS, OUT, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    stride_bias, lora_scale, seed, thr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, Q_KN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """_lora_gemm_kernel on a fixed grid (about one program per SM, kernels/lora_gemm_tuning.py
    `persistent_programs`): each program walks the output tiles in grouped order with a stride of the grid,
    so the programs of one wave share W0's column tiles in L2 and no tile waits for a program to launch.
    No warp_specialize on the tile loop: Triton (3.9) ignores it on sm_90 for this loop (identical code), and on
    the K loop it aborts the compiler (see kernels/lora_gemm_tuning.py)."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        _lora_gemm_tile(tile, P, Q, L, RM, BIAS, OUT, OUT, OUT, M, N, K, R,
                        stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
                        stride_om, stride_on, stride_bias, 0, lora_scale, seed, thr,
                        HAS_BIAS=HAS_BIAS, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR, EVEN_K=EVEN_K,
                        DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA, Q_KN=Q_KN, COL_SCALE=0, STORE_PRE=False,
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, GROUP_M=GROUP_M)


@triton.jit
def _lora_gemm_packed_kernel(
    P, Q, L, RM, BIAS, OUT, MASK, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    stride_bias, stride_mask, lora_scale,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    Q_KN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """_lora_gemm_kernel with the keep-mask of the low-rank term read from packed bits MASK [M, ceil(N/8)]
    (dropout_mask="packed": the backward's dX), no seed."""
    _lora_gemm_tile(tl.program_id(0), P, Q, L, RM, BIAS, OUT, OUT, OUT, M, N, K, R,
                    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
                    stride_om, stride_on, stride_bias, 0, lora_scale, 0, 0,
                    HAS_BIAS=HAS_BIAS, HAS_DROPOUT=True, SEED_PTR=False, EVEN_K=EVEN_K,
                    DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA, Q_KN=Q_KN, COL_SCALE=0, STORE_PRE=False,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, GROUP_M=GROUP_M,
                    MASK=MASK, stride_mask=stride_mask, PACKED=True)


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_gemm_scaled_kernel(
    P, Q, L, RM, BIAS, OUT, COL, PRE, M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    stride_bias, stride_col, lora_scale, seed, thr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, Q_KN: tl.constexpr, COL_SCALE: tl.constexpr,
    STORE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    _lora_gemm_tile(tl.program_id(0), P, Q, L, RM, BIAS, OUT, COL, PRE, M, N, K, R,
                    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
                    stride_om, stride_on, stride_bias, stride_col, lora_scale, seed, thr,
                    HAS_BIAS=HAS_BIAS, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR, EVEN_K=EVEN_K,
                    DOT_PRECISION=DOT_PRECISION, USE_TMA=USE_TMA, Q_KN=Q_KN, COL_SCALE=COL_SCALE,
                    STORE_PRE=STORE_PRE, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
                    GROUP_M=GROUP_M)


@triton.jit
def _lora_bwd_dy_kernel(
    DY, B, S, DS_PART, DB_PART, DBIAS_PART, M, N, R, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    scaling,
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    rows = offs_m.to(tl.int64)
    n_lo = pid_s * n_per_split
    n_hi = min(N, n_lo + n_per_split)
    if COMPUTE_DB:
        s_tile = tl.load(S + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(DY.dtype.element_ty)
    if USE_TMA:  # splits are whole tiles, so only the matrix edge needs the zero fill
        dy_desc = tl.make_tensor_descriptor(DY, shape=[M, N], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_N])
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        if USE_TMA:
            dy = dy_desc.load([pid_m * BLOCK_M, n0])
        else:
            dy = tl.load(DY + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if COMPUTE_DS:
            b = tl.load(B + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            ds = tl.dot(dy, b.to(dy.dtype), ds, input_precision=DOT_PRECISION)
        if COMPUTE_DB:
            db = tl.dot(tl.trans(dy), s_tile, input_precision=DOT_PRECISION) * scaling
            db_ptrs = DB_PART + pid_m.to(tl.int64) * N * R + offs_n[:, None] * R + offs_r[None, :]
            tl.store(db_ptrs, db, mask=n_mask[:, None] & r_mask[None, :])
        if COMPUTE_DBIAS:
            tl.store(DBIAS_PART + pid_m.to(tl.int64) * N + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=n_mask)
    if COMPUTE_DS:
        ds_ptrs = DS_PART + pid_s.to(tl.int64) * M * R + rows[:, None] * R + offs_r[None, :]
        tl.store(ds_ptrs, ds * scaling, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_bwd_db_kernel(
    DY, S, DB_PART, DBIAS_PART, M, N, R, m_per_split,
    stride_dym, stride_dyn, stride_sm, stride_sr,
    scaling,
    COMPUTE_DB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dB = s·dYᵀ·S and dbias = Σ dY for a column tile of dY over one split of the rows: the fp32 accumulators
    stay in registers over the split, and the program writes one partial (DB_PART [splits, N, R], DBIAS_PART
    [splits, N])."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < N
    r_mask = offs_r < R
    m_lo = pid_s * m_per_split
    m_hi = min(M, m_lo + m_per_split)
    if USE_TMA:  # splits are whole tiles, so only the matrix edge needs the zero fill
        dy_desc = tl.make_tensor_descriptor(DY, shape=[M, N], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_N])
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_hi
        rows = offs_m.to(tl.int64)
        if USE_TMA:
            dy = dy_desc.load([m0, pid_n * BLOCK_N])
        else:
            dy = tl.load(DY + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if COMPUTE_DB:
            s_tile = tl.load(S + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            db = tl.dot(tl.trans(dy), s_tile.to(dy.dtype), db, input_precision=DOT_PRECISION)
        if COMPUTE_DBIAS:
            dbias += tl.sum(dy.to(tl.float32), axis=0)
    if COMPUTE_DB:
        db_ptrs = DB_PART + pid_s.to(tl.int64) * N * R + offs_n[:, None] * R + offs_r[None, :]
        tl.store(db_ptrs, db * scaling, mask=n_mask[:, None] & r_mask[None, :])
    if COMPUTE_DBIAS:
        tl.store(DBIAS_PART + pid_s.to(tl.int64) * N + offs_n, dbias, mask=n_mask)


@triton.jit
def _lora_bwd_da_body(
    X, DS, DA_PART, M, K, R, m_per_split,
    stride_xm, stride_xk, stride_dsm, stride_dsr,
    seed, thr, drop_scale,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    MASK=None, stride_mask=0, PACKED: tl.constexpr = False,
):
    """_lora_bwd_da_kernel, and with PACKED (_lora_bwd_da_packed_kernel) the keep-mask read from the bits MASK."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < R
    m_lo = pid_s * m_per_split
    m_hi = min(M, m_lo + m_per_split)
    if USE_TMA:  # splits are whole tiles, so only the matrix edge needs the zero fill
        x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_hi
        rows = offs_m.to(tl.int64)
        if USE_TMA:
            x = x_desc.load([m0, pid_k * BLOCK_K])
        else:
            x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT and PACKED:  # rows past M wrapped: x is 0 there
            x = tl.where(load_keep_bits(MASK, stride_mask, offs_m % M, pid_k * BLOCK_K, K, BLOCK_M, BLOCK_K), x, 0.0)
        elif HAS_DROPOUT:  # a tensor seed is loaded here, at its use: loaded once before the loop it spilled (sm_90, r16)
            key = dropout_seed(seed, SEED_PTR)
            x = tl.where(dropout_keep(key, offs_m, pid_k * BLOCK_K, thr, BLOCK_M, BLOCK_K), x, 0.0)
        ds = tl.load(DS + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(ds.to(x.dtype)), x, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * drop_scale
    da_ptrs = DA_PART + pid_s.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :]
    tl.store(da_ptrs, acc, mask=r_mask[:, None] & k_mask[None, :])


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_bwd_da_kernel(
    X, DS, DA_PART, M, K, R, m_per_split,
    stride_xm, stride_xk, stride_dsm, stride_dsr,
    seed, thr, drop_scale,
    HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    _lora_bwd_da_body(X, DS, DA_PART, M, K, R, m_per_split, stride_xm, stride_xk, stride_dsm, stride_dsr,
                      seed, thr, drop_scale, HAS_DROPOUT=HAS_DROPOUT, SEED_PTR=SEED_PTR, DOT_PRECISION=DOT_PRECISION,
                      USE_TMA=USE_TMA, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)


@triton.jit
def _lora_bwd_da_packed_kernel(
    X, DS, DA_PART, MASK, M, K, R, m_per_split,
    stride_xm, stride_xk, stride_dsm, stride_dsr, stride_mask,
    drop_scale,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    _lora_bwd_da_body(X, DS, DA_PART, M, K, R, m_per_split, stride_xm, stride_xk, stride_dsm, stride_dsr,
                      0, 0, drop_scale, HAS_DROPOUT=True, SEED_PTR=False, DOT_PRECISION=DOT_PRECISION,
                      USE_TMA=USE_TMA, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
                      MASK=MASK, stride_mask=stride_mask, PACKED=True)


# ----------------------------------------------------------------------------------------------- launchers


def packed_tiles(kind: str, cfg: dict, dtype: torch.dtype, precision: str | None = None) -> dict:
    """Tiles of a packed-mask skinny kernel ("shrink" or "da"): the regenerating kernel's (skinny_config), narrowed
    where the bit shuffles beside its tiles spill (tests/test_lora_dropout_static.py): dA's 128-column tile to 64
    columns; the shrink's FMA-dot tiles (fp32 at "ieee", `precision` as in tiles_for) to 16 x 32."""
    cfg = dict(cfg)
    if kind == "da":
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 64)
    elif _common.fma_dots(dtype, precision):
        cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 16), BLOCK_K=min(cfg["BLOCK_K"], 32))
    return cfg


def lora_shrink(x: torch.Tensor, a: torch.Tensor, p: float, seed, thr: int, mask=None) -> torch.Tensor:
    """S = dropout(x)·Aᵀ in x's dtype; x [M, K] and A [R, K] with any strides; seed an int or a tensor (seed_arg).

    mask: with p > 0, a uint8 [M, ceil(K/8)] tensor with unit column stride that receives the keep-mask as bits
    (dropout_mask="packed", kernels/philox.py's layout), or None."""
    M, K = x.shape
    R = a.shape[0]
    s = torch.empty((M, R), device=x.device, dtype=x.dtype)
    path = path_for(x.device, x)
    cfg = skinny_config("shrink", R, x.dtype, path)
    if mask is not None and p > 0:
        cfg = packed_tiles("shrink", cfg, x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    seed, seed_ptr = seed_arg(seed, x.device) if p > 0 else (0, False)
    strides = (x.stride(0), x.stride(1), a.stride(0), a.stride(1), s.stride(0), s.stride(1))
    opts = dict(seed=seed, thr=thr, drop_scale=1.0 / (1.0 - p), HAS_DROPOUT=p > 0, SEED_PTR=seed_ptr,
                EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(x.dtype), USE_TMA=path == "tma",
                BLOCK_R=rank_block(R), **tile_args(cfg), **launch_opts(cfg))
    if mask is not None and p > 0:
        _launch(_lora_shrink_packed_kernel, grid, x, a, s, mask, M, K, R, *strides, mask.stride(0), **opts)
    else:
        _launch(_lora_shrink_kernel, grid, x, a, s, M, K, R, *strides, **opts)
    return s


def lora_gemm(p_mat, q_t, l_mat, rm_t, bias, lora_scale: float, dropout: tuple | None, *, col=None,
              col_mode: str = "epilogue", store_pre: bool = False, tuned: tuple[str, dict] | None = None,
              mask=None):
    """out = P·Q + lora_scale·keep⊙(L·Rm) + bias, where q_t = Qᵀ [N, K] and rm_t = Rmᵀ [N, R] as given.

    dropout: (seed, thr) to apply the keep-mask to the low-rank term (seed: an int or a tensor, see seed_arg), or
    None. Every tensor may have any strides, bias [N] included (stride 0: one value for every column).
    col: an optional per-column scale (DoRA's m/‖W0 + s·B·A‖), any float dtype and strides; the column-scaled
    kernel takes its own tiles (scaled_gemm_config). col_mode "epilogue": col [N] scales the output's columns
    before the bias, out = col ⊙ (P·Q + c·L·Rm) + bias; with store_pre the unscaled product is returned too,
    (out, pre) (on the pointer path, whose compiled variant would spill, the kernel stores the unscaled product
    and col and bias are applied in PyTorch). col_mode "prologue": col [K] scales P's columns,
    out = (P ⊙ col)·Q + c·keep⊙(L·Rm) (+ bias), the product rounded to P's dtype as it is loaded.
    Without col, the config is kernels/lora_gemm_tuning.py's (measured on CUDA tensors); tuned = (path, config)
    launches with that one instead (its runners, on fresh tensors; the tests), the persistent kernel for a
    config with PERSISTENT.
    mask (no col; dropout given): the keep-mask as packed bits, uint8 [M, ceil(N/8)] with unit column stride
    (dropout_mask="packed", kernels/philox.py's layout), read instead of regenerated from the seed; the static
    dropout tiles (gemm_config).
    """
    M, K = p_mat.shape
    N = q_t.shape[0]
    R = l_mat.shape[1]
    if col is not None:
        if col_mode not in ("epilogue", "prologue"):
            raise ValueError(f"col_mode: expected 'epilogue' or 'prologue', got {col_mode!r}")
        n_col = N if col_mode == "epilogue" else K
        if col.dim() != 1 or col.shape[0] != n_col:
            raise ValueError(f"col: expected shape [{n_col}] for col_mode={col_mode!r}, got {tuple(col.shape)}")
        if store_pre and col_mode != "epilogue":
            raise ValueError("store_pre: only with col_mode='epilogue'")
    out = torch.empty((M, N), device=p_mat.device, dtype=p_mat.dtype)
    q_kn = q_t.stride(1) != 1  # Q itself is row-major [K, N] (backward's W0) rather than [N, K]
    path = path_for(p_mat.device, p_mat, q_t.t() if q_kn else q_t, out)
    if tuned is not None:
        path, cfg = tuned
    if col is not None and store_pre and path not in STORE_PRE_PATHS:  # two passes (see the docstring)
        pre = lora_gemm(p_mat, q_t, l_mat, rm_t, None, lora_scale, dropout)
        out.copy_(pre * col)
        if bias is not None:
            out += bias
        return out, pre
    if col is not None:
        cfg = scaled_gemm_config(M, p_mat.dtype, path)
    elif mask is not None and tuned is None:  # packed bits: no tuned or persistent variant
        cfg = gemm_config(M, p_mat.dtype, path, True)
    elif tuned is None:
        cfg = tuned_gemm_config(lora_gemm, p_mat, q_t, l_mat, rm_t, bias, lora_scale, dropout, path, q_kn)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    persistent = col is None and mask is None and cfg.get("PERSISTENT", False)
    grid = (persistent_programs(p_mat.device, tiles) if persistent else tiles,)
    seed, thr = dropout if dropout is not None else (0, 0)
    seed, seed_ptr = seed_arg(seed, p_mat.device)
    common = (p_mat.stride(0), p_mat.stride(1), q_t.stride(1), q_t.stride(0), l_mat.stride(0), l_mat.stride(1),
              rm_t.stride(1), rm_t.stride(0), out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0)
    consts = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout is not None, SEED_PTR=seed_ptr,
                  EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(p_mat.dtype), USE_TMA=path == "tma",
                  Q_KN=q_kn, BLOCK_R=gemm_rank_block(R, cfg), **tile_args(cfg), **launch_opts(cfg))
    if col is None and mask is not None:  # dropout_mask="packed": the keep bits read, no seed
        _lora_gemm_packed_kernel[grid](p_mat, q_t, l_mat, rm_t, bias if bias is not None else out, out, mask, M, N, K,
                                       R, *common, mask.stride(0), lora_scale,
                                       **{k: v for k, v in consts.items() if k not in ("HAS_DROPOUT", "SEED_PTR")})
        return out
    if col is None:
        _launch(_lora_gemm_persistent_kernel if persistent else _lora_gemm_kernel, grid, p_mat, q_t, l_mat, rm_t,
                bias if bias is not None else out, out, M, N, K, R, *common, lora_scale, seed=seed, thr=thr, **consts)
        return out
    pre = torch.empty_like(out) if store_pre else out  # out's shape, dtype and strides (the kernel takes out's)
    _launch(_lora_gemm_scaled_kernel, grid, p_mat, q_t, l_mat, rm_t, bias if bias is not None else out, out, col, pre,
            M, N, K, R, *common, col.stride(0), lora_scale, seed=seed, thr=thr,
            COL_SCALE=1 if col_mode == "epilogue" else 2, STORE_PRE=store_pre, **consts)
    return (out, pre) if store_pre else out


def _sum_parts(part: torch.Tensor) -> torch.Tensor:
    """Σ over the partials (dimension 0) in a fixed order; a single partial is the result itself."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


def lora_bwd_dy(dy, b, s, scaling: float, need_ds: bool, need_db: bool, need_dbias: bool):
    """dS = s·dY·B (fp32 [M, R]), dB = s·dYᵀ·S (fp32 [N, R]), dbias = Σ_rows dY (fp32).

    Temporaries (fp32 partials), each at most one output plus PARTIAL_BUDGET (4 MiB) bytes, whatever M:
      dS: [n_splits, M, R], the columns split only while the row blocks alone leave the GPU idle.
      dB and dbias: one pass over dY (the dY kernel, one partial per row block) while the row blocks' partials
      fit the budget; else [splits, N, R] and [splits, N] from _lora_bwd_db_kernel (reduction_programs).
    At M = 8192 (bf16, 132 SMs, "tma" tiles) the dB partial was [128, N, R]: 32 MiB at N = 4096, r = 16 and
    688 MiB (721 MB) at N = 11008, r = 128; now [9, 4096, 16] = 2.25 MiB and [1, 11008, 128], the output itself
    (5.4 MiB fp32, no partial); at N = 4096, r = 128: 256 MiB before, [2, 4096, 128] = 4 MiB now. dS:
    [3, 8192, 16] = 1.5 MiB before and now at r = 16; [3, 8192, 128] = 12 MiB before, [2, 8192, 128] = 8 MiB
    (the output plus 4 MiB) now at r = 128."""
    M, N = dy.shape
    R = b.shape[1]
    path = path_for(dy.device, dy)
    cfg = skinny_config("dy", R, dy.dtype, path)
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    f32 = dict(device=dy.device, dtype=torch.float32)
    red_bytes = 4 * N * ((R if need_db else 0) + (1 if need_dbias else 0))  # dB and dbias partials of one program
    # one read of dY while a dB partial per row block stays within the budget; else the separate dB kernel
    fused = (need_db or need_dbias) and (m_blocks - 1) * red_bytes <= _common.PARTIAL_BUDGET
    ds = db = dbias = None
    if need_ds or fused:
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        n_per, n_splits = split_even(n_blocks, reduction_programs(dy.device, n_blocks, m_blocks, 4 * M * R)
                                     if need_ds else 1)
        ds_part = torch.empty((n_splits, M, R), **f32) if need_ds else None
        db_part = torch.empty((m_blocks, N, R), **f32) if fused and need_db else None
        dbias_part = torch.empty((m_blocks, N), **f32) if fused and need_dbias else None
        dummy = dy
        _lora_bwd_dy_kernel[(m_blocks, n_splits)](
            dy, b, s, ds_part if need_ds else dummy, db_part if db_part is not None else dummy,
            dbias_part if dbias_part is not None else dummy,
            M, N, R, n_per * cfg["BLOCK_N"],
            dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), s.stride(0), s.stride(1), scaling,
            COMPUTE_DS=need_ds, COMPUTE_DB=db_part is not None, COMPUTE_DBIAS=dbias_part is not None,
            DOT_PRECISION=dot_precision(dy.dtype), USE_TMA=path == "tma", BLOCK_R=rank_block(R),
            **tile_args(cfg), **launch_opts(cfg),
        )
        ds = _sum_parts(ds_part) if need_ds else None
        db = _sum_parts(db_part) if db_part is not None else None
        dbias = _sum_parts(dbias_part) if dbias_part is not None else None
    if (need_db or need_dbias) and not fused:
        db, dbias = lora_bwd_db(dy, s, scaling, need_db, need_dbias)
    return ds, db, dbias


def db_programs(device, M: int, N: int, R: int, cfg: dict, need_db: bool, need_dbias: bool) -> tuple[int, int]:
    """(rows per split, splits) of _lora_bwd_db_kernel: reduction_programs over the row blocks."""
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    part_bytes = 4 * N * ((R if need_db else 0) + (1 if need_dbias else 0))
    m_per, m_splits = split_even(m_blocks, reduction_programs(device, m_blocks, triton.cdiv(N, cfg["BLOCK_N"]),
                                                              part_bytes))
    return m_per * cfg["BLOCK_M"], m_splits


def lora_bwd_db(dy, s, scaling: float, need_db: bool, need_dbias: bool):
    """dB = s·dYᵀ·S (fp32 [N, R]) and dbias = Σ_rows dY (fp32 [N]) on a fixed number of programs along M
    (db_programs): partials [splits, N, R] and [splits, N], at most one output plus PARTIAL_BUDGET bytes."""
    M, N = dy.shape
    R = s.shape[1]
    path = path_for(dy.device, dy)
    cfg = skinny_config("db", R, dy.dtype, path)
    m_per, m_splits = db_programs(dy.device, M, N, R, cfg, need_db, need_dbias)
    f32 = dict(device=dy.device, dtype=torch.float32)
    db_part = torch.empty((m_splits, N, R), **f32) if need_db else None
    dbias_part = torch.empty((m_splits, N), **f32) if need_dbias else None
    _lora_bwd_db_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), m_splits)](
        dy, s, db_part if need_db else dy, dbias_part if need_dbias else dy, M, N, R, m_per,
        dy.stride(0), dy.stride(1), s.stride(0), s.stride(1), scaling,
        COMPUTE_DB=need_db, COMPUTE_DBIAS=need_dbias, DOT_PRECISION=dot_precision(dy.dtype), USE_TMA=path == "tma",
        BLOCK_R=rank_block(R), **tile_args(cfg), **launch_opts(cfg),
    )
    return (_sum_parts(db_part) if need_db else None), (_sum_parts(dbias_part) if need_dbias else None)


def lora_bwd_da(x, ds, p: float, seed, thr: int, mask=None) -> torch.Tensor:
    """dA = dSᵀ·dropout(x) in fp32 [R, K]; one read of x, the forward's mask regenerated (or, with p > 0 and
    `mask`, read from those packed bits, uint8 [M, ceil(K/8)]: dropout_mask="packed").

    Temporary: fp32 partials [m_splits, R, K], m_splits = reduction_programs over the row blocks (at most one
    output plus PARTIAL_BUDGET bytes). At M = 8192 (bf16, 132 SMs, "tma" tiles): [9, 16, 4096] = 2.25 MiB at
    r = 16 (unchanged: the splits were already a fixed number); for K = 4096, r = 128: [5, 128, 4096] = 10 MiB
    before, [3, ...] = 6 MiB now; for K = 11008, r = 128: [2, 128, 11008] = 10.75 MiB before, [1, ...] (the
    output itself, 5.4 MiB) now."""
    M, K = x.shape
    R = ds.shape[1]
    path = path_for(x.device, x)
    cfg = skinny_config("da", R, x.dtype, path)
    if mask is not None and p > 0:
        cfg = packed_tiles("da", cfg, x.dtype)
    k_blocks = triton.cdiv(K, cfg["BLOCK_K"])
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    m_per, m_splits = split_even(m_blocks, reduction_programs(x.device, m_blocks, k_blocks, 4 * R * K))
    da_part = torch.empty((m_splits, R, K), device=x.device, dtype=torch.float32)
    grid, strides = (k_blocks, m_splits), (x.stride(0), x.stride(1), ds.stride(0), ds.stride(1))
    consts = dict(DOT_PRECISION=dot_precision(x.dtype), USE_TMA=path == "tma", BLOCK_R=rank_block(R),
                  **tile_args(cfg), **launch_opts(cfg))
    if mask is not None and p > 0:  # dropout_mask="packed": the keep bits read, no seed
        _lora_bwd_da_packed_kernel[grid](x, ds, da_part, mask, M, K, R, m_per * cfg["BLOCK_M"], *strides,
                                         mask.stride(0), 1.0 / (1.0 - p), **consts)
    else:
        seed, seed_ptr = seed_arg(seed, x.device) if p > 0 else (0, False)
        _launch(_lora_bwd_da_kernel, grid, x, ds, da_part, M, K, R, m_per * cfg["BLOCK_M"], *strides, seed=seed,
                thr=thr, drop_scale=1.0 / (1.0 - p), HAS_DROPOUT=p > 0, SEED_PTR=seed_ptr, **consts)
    return _sum_parts(da_part)


def lora_linear_fwd(x, weight, lora_a, lora_b, bias, scaling: float, p: float, seed, thr: int, mask=None):
    """Forward on 2-D x [M, K]: returns (y [M, N] in x's dtype, S [M, R] saved for backward).

    mask: with p > 0, a uint8 [M, ceil(K/8)] tensor the shrink fills with the keep-mask's bits
    (dropout_mask="packed"; the decode kernel does not write it, so such a call takes the shrink and the GEMM).

    seed: an int, or a 0-d int64 tensor on x's device (read by the kernels, never on the host). Up to 16 rows:
    one launch (kernels/lora_decode.py); else the shrink, then the GEMM."""
    if 0 < x.shape[0] <= 16 and weight.shape[0] > 0 and (mask is None or p == 0):
        return lora_decode(x, weight, lora_a, lora_b, bias, scaling, p, seed, thr)
    s = lora_shrink(x, lora_a, p, seed, thr, mask)
    y = lora_gemm(x, weight, s, lora_b, bias, scaling, None)
    return y, s


def lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, scaling: float, p: float, seed, thr: int, needs, mask=None):
    """Backward on 2-D tensors. needs = (dx, dA, dB, dbias) flags; returns those four (None where not needed).
    mask: the forward's packed keep bits (dropout_mask="packed"), read instead of regenerating the mask."""
    need_dx, need_da, need_db, need_dbias = needs
    ds, db, dbias = lora_bwd_dy(dy, lora_b, s, scaling, need_dx or need_da, need_db, need_dbias)
    if ds is not None:  # both consumers multiply dS in dY's dtype; casting once halves their operand tiles
        ds = ds.to(dy.dtype)
    dx = da = None
    if need_dx:
        # dX = dY·W0 + keep⊙(dS·A)/(1-p): Q = W0 given as its transpose view, Rm = A likewise
        dx = lora_gemm(dy, weight.t(), ds, lora_a.t(), None, 1.0 / (1.0 - p), (seed, thr) if p > 0 else None,
                       mask=mask if p > 0 else None)
    if need_da:
        da = lora_bwd_da(x, ds, p, seed, thr, mask).to(lora_a.dtype)
    if db is not None:
        db = db.to(lora_b.dtype)
    if dbias is not None:
        dbias = dbias.to(dy.dtype)
    return dx, da, db, dbias
