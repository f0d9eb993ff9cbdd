"""Fused QLoRA linear: LoRA over a bitsandbytes 4-bit (NF4 / FP4) frozen W0, dequantized tile by tile.

    forward:  y  = x·deq(W0)ᵀ + bias + s·S·Bᵀ                   S = dropout(x)·Aᵀ (LoRA's shrink kernel)
    backward: dX = dY·deq(W0) + keep⊙(dS·A)/(1-p)               dS, dB, dbias, dA: LoRA's kernels

_qlora_gemm_kernel is LoRA's GEMM (kernels/lora_linear.py) with its right operand dequantized in the K loop:
each W0 tile's packed codes (uint8, two per byte, the even flat index in the high nibble) and block scales are
loaded once per tile and turned into the compute dtype in registers, so no full-precision W0 exists in memory.
An element's value is code[q] · absmax[flat // BS] in fp32 (flat = row·WK + col over the row-major [out, in]
W0), with double quantization absmax = code2[qa] · absmax2[block // BS2] + offset, in fp32, two roundings:
the launch turns off the compiler's multiply-add fusion (enable_fp_fusion=False) so these are bitsandbytes'
bits. The value is rounded to the compute dtype, in backward first to the dtype W0 was quantized from (MID).

Argument legend: P [M, K] the left operand (x, or dY); W the packed codes, ABSMAX the scales (fp32, or uint8
codes when NESTED) of W0 [N_w, WK]; TRANS_W False: the forward, Q = deq(W0)ᵀ (output columns are W0's rows,
K = WK); True: the backward, Q = deq(W0) (the reduction runs over W0's rows, output columns are its columns,
N = WK). PAIRED: WK even, so a tile row's codes are whole bytes, loaded once and split. ROW_SCALE: WK % BS == 0
and the tile's W0 column width divides BS, so each tile row has one scale (a [rows] load, not [rows, cols]).
L, RM, lora_scale, seed, thr as in kernels/lora_linear.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, grouped_tile, interpreting, launch_opts, rank_block, tile_args, tiles_for
from .lora_linear import lora_bwd_da, lora_bwd_dy, lora_shrink, seed_arg
from .philox import dropout_keep, dropout_seed

# pointer tiles only; sized so the heaviest prologue (scales gathered per element, odd in_features) spills
# nothing on sm_80/sm_90 (tests/test_qlora_static.py); not yet tuned on a GPU
QLORA_GEMM_CONFIGS = {
    "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, RANK_CHUNK=32, num_warps=8, num_stages=2),
    "mid": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, RANK_CHUNK=32, num_warps=4, num_stages=2,
                fp32=dict(BLOCK_K=16)),
    "large": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, RANK_CHUNK=32, num_warps=8, num_stages=2),
}
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, RANK_CHUNK=16, num_warps=4, num_stages=1)
MID_CODES = {None: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


def qlora_config_name(M: int) -> str:
    return "decode" if M <= 16 else "mid" if M <= 256 else "large"


def qlora_gemm_config(M: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    return tiles_for(QLORA_GEMM_CONFIGS[qlora_config_name(M)], dtype)


@triton.jit
def _deq_tile(W, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, wrows, row_ok, col0, WK, BS, BS2,
              NESTED: tl.constexpr, PAIRED: tl.constexpr, ROW_SCALE: tl.constexpr,
              TR: tl.constexpr, TC: tl.constexpr):
    """fp32 values of W0[wrows, col0:col0+TC] ([TR, TC]); elements outside W0 come out finite (masked loads)."""
    base = wrows.to(tl.int64) * WK  # flat index of each row's first element
    cols = col0 + tl.arange(0, TC)
    ok = row_ok[:, None] & (cols < WK)[None, :]
    if PAIRED:  # WK even: each tile row's codes are TC/2 whole bytes, high nibble first
        pcols = col0 // 2 + tl.arange(0, TC // 2)
        byt = tl.load(W + (base // 2)[:, None] + pcols[None, :],
                      mask=row_ok[:, None] & (pcols * 2 < WK)[None, :], other=0).to(tl.int32)
        q = tl.reshape(tl.join(byt >> 4, byt & 15), (TR, TC))
    else:
        flat = base[:, None] + cols[None, :]
        byt = tl.load(W + flat // 2, mask=ok, other=0).to(tl.int32)
        q = (byt >> ((1 - (flat % 2)) * 4).to(tl.int32)) & 15
    val = tl.load(CODE + q)
    if ROW_SCALE:  # one scale per tile row
        blk = (base + col0) // BS
        rmask = row_ok
    else:
        blk = (base[:, None] + cols[None, :]) // BS
        rmask = ok
    if NESTED:
        qa = tl.load(ABSMAX + blk, mask=rmask, other=0).to(tl.int32)
        amax = tl.load(CODE2 + qa) * tl.load(ABSMAX2 + blk // BS2, mask=rmask, other=0.0)
        amax = amax + tl.load(OFFSET)
    else:
        amax = tl.load(ABSMAX + blk, mask=rmask, other=0.0)
    if ROW_SCALE:
        out = val * amax[:, None]
    else:
        out = val * amax
    return out


@triton.jit(do_not_specialize=["seed", "thr"])
def _qlora_gemm_kernel(
    P, W, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, L, RM, BIAS, OUT, M, N, K, R, WK, BS, BS2,
    stride_pm, stride_pk, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias,
    lora_scale, seed, thr,
    TRANS_W: tl.constexpr, NESTED: tl.constexpr, PAIRED: tl.constexpr, ROW_SCALE: tl.constexpr,
    MID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    dt = P.dtype.element_ty

    # the low-rank term first, as in LoRA's GEMM: c·keep⊙(L·Rm), in rank chunks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_mask = offs_r < R - r0
        lo = tl.load(L + rows[:, None] * stride_lm + (r0 + offs_r[None, :]) * stride_lr, mask=r_mask[None, :], other=0.0)
        rm = tl.load(RM + (r0 + offs_r[:, None]) * stride_rr + cols[None, :] * stride_rn, mask=r_mask[:, None], other=0.0)
        acc = tl.dot(lo.to(dt), rm.to(dt), acc, input_precision=DOT_PRECISION)
    acc = acc * lora_scale
    if HAS_DROPOUT:
        key = dropout_seed(seed, SEED_PTR)
        acc = tl.where(dropout_keep(key, offs_m, pid_n * BLOCK_N, thr, BLOCK_M, BLOCK_N), acc, 0.0)

    p_ptrs = P + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk
    n_ok = offs_n < N
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            p = tl.load(p_ptrs)
        else:
            p = tl.load(p_ptrs, mask=(offs_k < K - k0)[None, :], other=0.0)
        if TRANS_W:  # backward: W0 rows k0.., columns the output's
            w = _deq_tile(W, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, k0 + offs_k, offs_k < K - k0, pid_n * BLOCK_N,
                          WK, BS, BS2, NESTED, PAIRED, ROW_SCALE, BLOCK_K, BLOCK_N)
        else:  # forward: W0 rows the output's columns, columns k0..
            w = _deq_tile(W, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, cols, n_ok, k0,
                          WK, BS, BS2, NESTED, PAIRED, ROW_SCALE, BLOCK_N, BLOCK_K)
        if MID == 1:
            w = w.to(tl.float16)
        elif MID == 2:
            w = w.to(tl.bfloat16)
        w = w.to(dt)
        if TRANS_W:
            q = w
        else:
            q = tl.trans(w)
        acc = tl.dot(p, q, acc, input_precision=DOT_PRECISION)
        p_ptrs += BLOCK_K * stride_pk

    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


def _mid_code(q, dtype: torch.dtype, backward: bool) -> int:
    """MID: the dtype deq(W0) is rounded to before the compute dtype (backward: the one W0 was quantized from)."""
    if not backward or q.dtype == dtype or q.dtype == torch.float32:
        return 0
    return MID_CODES.get(q.dtype, 0)


def qlora_gemm(p_mat, q, l_mat, rm_t, bias, lora_scale: float, dropout, *, transpose_w: bool):
    """out = P·Q + lora_scale·keep⊙(L·Rm) + bias with Q = deq(W0)ᵀ (forward) or deq(W0) (transpose_w: backward).
    q: a Quant4 (fastpeft/ops/qlora_linear_torch.py); rm_t = Rmᵀ [N, R]; dropout (seed, thr) or None."""
    M, K = p_mat.shape
    WK = q.in_features
    N = WK if transpose_w else q.out_features
    R = l_mat.shape[1]
    out = torch.empty((M, N), device=p_mat.device, dtype=p_mat.dtype)
    cfg = qlora_gemm_config(M, p_mat.dtype)
    tile_cols = cfg["BLOCK_N"] if transpose_w else cfg["BLOCK_K"]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    seed, thr = dropout if dropout is not None else (0, 0)
    seed, seed_ptr = seed_arg(seed, p_mat.device)
    nested = q.absmax2 is not None
    absmax2 = q.absmax2 if nested else q.absmax
    code2 = q.code2 if nested else q.code
    offset = q.offset if nested else q.code
    _qlora_gemm_kernel[grid](
        p_mat, q.packed, q.absmax, q.code, absmax2, code2, offset, l_mat, rm_t, bias if bias is not None else out, out,
        M, N, K, R, WK, q.blocksize, max(q.blocksize2, 1),
        p_mat.stride(0), p_mat.stride(1), l_mat.stride(0), l_mat.stride(1), rm_t.stride(1), rm_t.stride(0),
        out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0, lora_scale, seed, thr,
        TRANS_W=transpose_w, NESTED=nested, PAIRED=WK % 2 == 0,
        ROW_SCALE=WK % q.blocksize == 0 and q.blocksize % tile_cols == 0,
        MID=_mid_code(q, p_mat.dtype, transpose_w), HAS_BIAS=bias is not None, HAS_DROPOUT=dropout is not None,
        SEED_PTR=seed_ptr, EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(p_mat.dtype),
        BLOCK_R=min(rank_block(R), cfg["RANK_CHUNK"]), enable_fp_fusion=False, **tile_args(cfg), **launch_opts(cfg),
    )
    return out


def qlora_linear_fwd(x, q, lora_a, lora_b, bias, scaling: float, p: float, seed, thr: int):
    """Forward on 2-D x [M, in]: (y [M, out] in x's dtype, S [M, r] saved for backward)."""
    s = lora_shrink(x, lora_a, p, seed, thr)
    y = qlora_gemm(x, q, s, lora_b, bias, scaling, None, transpose_w=False)
    return y, s


def qlora_linear_bwd(dy, x, q, lora_a, lora_b, s, scaling: float, p: float, seed, thr: int, needs):
    """Backward on 2-D tensors; needs = (dx, dA, dB, dbias). Returns those four (None where not needed)."""
    need_dx, need_da, need_db, need_dbias = needs
    ds, db, dbias = lora_bwd_dy(dy, lora_b, s, scaling, need_dx or need_da, need_db, need_dbias)
    if ds is not None:
        ds = ds.to(dy.dtype)
    dx = da = None
    if need_dx:
        dx = qlora_gemm(dy, q, ds, lora_a.t(), None, 1.0 / (1.0 - p), (seed, thr) if p > 0 else None,
                        transpose_w=True)
    if need_da:
        da = lora_bwd_da(x, ds, p, seed, thr).to(lora_a.dtype)
    if db is not None:
        db = db.to(lora_b.dtype)
    if dbias is not None:
        dbias = dbias.to(dy.dtype)
    return dx, da, db, dbias
