"""Multi-adapter LoRA over one shared base weight: y_m = x_m·W0ᵀ + b + s_a·(x_m·A_aᵀ)·B_aᵀ, a = id of token m.

The adapters live in one stacked pool: A_pool [R_total, K] and B_pool [N, R_total]; adapter a owns pool rank
rows offsets[a] .. offsets[a] + ranks[a] and has its own scaling. Every rank loop runs to the adapter's own
rank (masks on r), so an adapter of rank 8 moves rank-8 bytes even in a pool whose largest rank is 64.
Ids outside [0, n_adapters) and adapters of rank 0 mean "base only". Every tensor is addressed through its
strides, 1-D ones included (ids, bias, scalings; stride 0 is one value for all); ids may be of any signed
integer type or uint8. Ranks and offsets are contiguous int32 (AdapterTable makes them so).

Token order and the multi-adapter epilogue.
  - The base GEMM (forward y and backward dX) keeps plain BLOCK_M row tiles in token order, so W0 is read
    once per row tile exactly as for one adapter. Its low-rank epilogue loops over the distinct adapters of
    the tile (`_next_adapter`: a min reduction over the tile's ids) and per adapter adds one dot of that
    adapter's rows (the others masked to zero) with its B (or A) tile. Per-sequence ids (runs of tokens)
    give one or two adapters per tile; random per-token ids over n adapters give up to min(BLOCK_M, n),
    each a rank-r dot (r/K of the main loop's work). Splitting row tiles per adapter segment instead would
    cost an extra full K loop per adapter (2x the GEMM at 64 adapters, M = 8192), and gathering rows
    through a sort permutation in the GEMM costs 0.2-1 KB of register spills at every tile size.
  - The shrink is skinny: for small M (decode, BGMV-style) it splits K over programs and each used
    adapter's A is read once; for larger M with per-token ids the launcher sorts the tokens by adapter
    on the device (stable torch.sort, no host sync) and the shrink's row tiles follow that order.
  - The backward reductions (dB, dA) need each adapter's tokens alone: they run over "segment tiles" (at
    most SEG_BLOCK_M sorted tokens of one adapter), write one fp32 partial per tile and sum each adapter's
    partials in a fixed order (`_multi_lora_segment_sum_kernel`): deterministic, no atomics.

Kernels (x [M, K], W0 [N, K]):
  _multi_lora_shrink_kernel      S[m, :r_a] = x_m·A_aᵀ            [M, R_MAX], split-K partials for small M
  _multi_lora_gemm_kernel        out = P·Q + Σ_a c_a·L_a·Rm_a + bias  forward: P=x, Q=W0ᵀ, L=S, Rm=B_aᵀ, c=s_a
                                                                      backward: P=dY, Q=W0, L=dS, Rm=A_a, c=1
  _multi_lora_bwd_dy_kernel      dS = s_a·dY·B_a, dB partials s_a·dYᵀ·S per segment tile (one read of dY)
  _multi_lora_bwd_da_kernel      dA partials dSᵀ·x per segment tile
  _multi_lora_segment_sum_kernel per adapter: Σ of its tiles' partials, into the pool gradient

Argument legend: P, Q, L, RM as in kernels/lora_linear.py (the K loop is kernels/gemm_loop.py's); IDS the
adapter id of every token, PERM the token rows sorted by adapter, TILES the segment tiles (`Grouping`),
RANKS / OFFS each adapter's rank and first row in the pool, SCALE its scaling; r_max the pool's largest
rank; n_adapters the pool size; *_PART fp32 partials; stride_<t><d> tensor t's stride along dimension d.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (  # noqa: F401 (rank_block, tiles_for: re-exported for the tests)
    dot_precision, grouped_tile, launch_opts, path_for, rank_block, split_blocks, target_programs, tile_args,
    tiles_for,
)
from .gemm_loop import gemm_k_loop
from .multi_lora_configs import (  # noqa: F401 (the tables, re-exported: fastpeft.kernels.multi_lora.*)
    DECODE_M, GEMM_CONFIGS, INTERPRETER_CONFIGS, INTERPRETER_SEG_BLOCK_M, MAX_RANK, SEG_BLOCK_M, SKINNY_CONFIGS,
    gemm_config, gemm_config_name, gemm_rank_block, rank_bucket, seg_block_m, skinny_config,
)
from .multi_lora_grouping import Grouping


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _next_adapter(ids, prev, n_adapters):
    """The smallest valid adapter id above `prev` among a tile's ids, or n_adapters when none is left."""
    return tl.min(tl.where((ids > prev) & (ids < n_adapters), ids, n_adapters), axis=0)


@triton.jit
def _tile_rows(PERM, IDS, stride_id, pos, pos_mask, M, n_adapters, PERMUTED: tl.constexpr):
    """Token rows (int64, in bounds for every lane) and adapter ids (int32, -1 for base-only and padding).

    IDS may be of any signed integer type or uint8 and any stride (0: one id for every token)."""
    if PERMUTED:
        rows = tl.load(PERM + pos, mask=pos_mask, other=0).to(tl.int64)
    else:
        rows = (pos % M).to(tl.int64)
    # widened first (uint8 zero-extends, signed types sign-extend) and compared before narrowing, so that
    # neither an unsigned id nor an int64 id past 2**31 can wrap into a valid one
    raw = tl.load(IDS + rows * stride_id, mask=pos_mask, other=0).to(tl.int64)
    ids = tl.where(pos_mask & (raw >= 0) & (raw < n_adapters), raw, -1).to(tl.int32)
    return rows, ids


@triton.jit
def _multi_lora_shrink_kernel(
    X, IDS, PERM, A, RANKS, OFFS, S, M, K, n_adapters, r_max, k_per_split,
    stride_id, stride_xm, stride_xk, stride_ar, stride_ak, stride_sp, stride_sm, stride_sr,
    PERMUTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_mask = pos < M
    rows, ids = _tile_rows(PERM, IDS, stride_id, pos, pos_mask, M, n_adapters, PERMUTED)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_lo = pid_s * k_per_split
    k_hi = min(K, k_lo + k_per_split)
    # rows of different adapters are disjoint, so one accumulator takes every adapter of the tile
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a = _next_adapter(ids, -1, n_adapters)
    while a < n_adapters:
        r_a = tl.load(RANKS + a)
        off = tl.load(OFFS + a).to(tl.int64)
        sel = ids == a
        r_mask = offs_r < r_a
        a_ptrs = A + (off + offs_r[None, :]) * stride_ar + (k_lo + offs_k[:, None]) * stride_ak
        x_ptrs = X + rows[:, None] * stride_xm + (k_lo + offs_k[None, :]) * stride_xk
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_mask = offs_k < k_hi - k0
            # masked rows are not fetched: x is read once over all adapters of the tile
            x = tl.load(x_ptrs, mask=sel[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            acc = tl.dot(x, at.to(x.dtype), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        a = _next_adapter(ids, a, n_adapters)
    s_ptrs = S + pid_s.to(tl.int64) * stride_sp + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(S.dtype.element_ty), mask=pos_mask[:, None] & (offs_r < r_max)[None, :])


@triton.jit
def _multi_lora_gemm_kernel(
    P, Q, L, RM, BIAS, OUT, IDS, SCALE, RANKS, OFFS, M, N, K, n_adapters,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    stride_id, stride_bias, stride_scale,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, Q_KN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_mask = pos < M
    # token order, never gathered: rows loaded through a permutation cost 0.2-1 KB of spills at every tile size
    rows, ids = _tile_rows(IDS, IDS, stride_id, pos, pos_mask, M, n_adapters, False)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    cols = (offs_n % N).to(tl.int64)

    # the low-rank terms first, while the accumulator is free: one masked dot per adapter of the tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a = _next_adapter(ids, -1, n_adapters)
    while a < n_adapters:
        r_a = tl.load(RANKS + a)
        off = tl.load(OFFS + a).to(tl.int64)
        sel = ids == a
        for r0 in range(0, r_a, BLOCK_R):
            r_mask = offs_r < r_a - r0
            lo = tl.load(L + rows[:, None] * stride_lm + (r0 + offs_r[None, :]) * stride_lr,
                         mask=sel[:, None] & r_mask[None, :], other=0.0)
            if HAS_SCALE:  # the adapter's scaling folded into its [BLOCK_M, BLOCK_R] rows, not the big tile
                lo = lo.to(tl.float32) * tl.load(SCALE + a * stride_scale).to(tl.float32)
            rm = tl.load(RM + (off + r0 + offs_r[:, None]) * stride_rr + cols[None, :] * stride_rn,
                         mask=r_mask[:, None], other=0.0)
            acc = tl.dot(lo.to(P.dtype.element_ty), rm.to(P.dtype.element_ty), acc, input_precision=DOT_PRECISION)
        a = _next_adapter(ids, a, n_adapters)

    # x / dY / y through pointers (rows in token order), W0 through a tensor descriptor on Hopper
    acc = gemm_k_loop(acc, P, Q, P, rows, cols, M, N, K, pid_m * BLOCK_M, pid_n * BLOCK_N,
                      stride_pm, stride_pk, stride_qk, stride_qn, 0,
                      P_DESC=False, Q_DESC=USE_TMA, Q_KN=Q_KN, HAS_PRO=False, EVEN_K=EVEN_K,
                      DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    out_ptrs = OUT + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=pos_mask[:, None] & (offs_n < N)[None, :])


@triton.jit
def _segment_tile(TILES, n_tiles, p, PERM, BLOCK_M: tl.constexpr):
    """Adapter (-1: no tile), token rows and row mask of segment tile p; TILES is [3, n_tiles] int32."""
    a = tl.load(TILES + p)
    start = tl.load(TILES + n_tiles + p)
    end = tl.load(TILES + 2 * n_tiles + p)
    pos = start + tl.arange(0, BLOCK_M)
    pos_mask = pos < end
    rows = tl.load(PERM + pos, mask=pos_mask, other=0).to(tl.int64)
    return a, rows, pos_mask


@triton.jit
def _multi_lora_bwd_dy_kernel(
    DY, B, S, PERM, TILES, SCALE, RANKS, OFFS, DS, DB_PART, n_tiles, N, r_max, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dsp, stride_dsm, stride_scale,
    COMPUTE_DS: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    p = tl.program_id(0)
    pid_s = tl.program_id(1)
    a, rows, pos_mask = _segment_tile(TILES, n_tiles, p, PERM, BLOCK_M)
    if a >= 0:
        r_a = tl.load(RANKS + a)
        off = tl.load(OFFS + a).to(tl.int64)
        scale = tl.load(SCALE + a * stride_scale).to(tl.float32)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r_a
        n_lo = pid_s * n_per_split
        n_hi = min(N, n_lo + n_per_split)
        if COMPUTE_DB:
            s_tile = tl.load(S + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                             mask=pos_mask[:, None] & r_mask[None, :], other=0.0).to(DY.dtype.element_ty)
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            dy = tl.load(DY + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=pos_mask[:, None] & n_mask[None, :], other=0.0)
            if COMPUTE_DS:
                b = tl.load(B + offs_n[:, None].to(tl.int64) * stride_bn + (off + offs_r[None, :]) * stride_br,
                            mask=n_mask[:, None] & r_mask[None, :], other=0.0)
                ds = tl.dot(dy, b.to(dy.dtype), ds, input_precision=DOT_PRECISION)
            if COMPUTE_DB:
                db = tl.dot(tl.trans(dy), s_tile, input_precision=DOT_PRECISION) * scale
                db_ptrs = DB_PART + p.to(tl.int64) * N * r_max + offs_n[:, None] * r_max + offs_r[None, :]
                tl.store(db_ptrs, db, mask=n_mask[:, None] & r_mask[None, :])
        if COMPUTE_DS:
            ds_ptrs = DS + pid_s.to(tl.int64) * stride_dsp + rows[:, None] * stride_dsm + offs_r[None, :]
            tl.store(ds_ptrs, ds * scale, mask=pos_mask[:, None] & (offs_r < r_max)[None, :])


@triton.jit
def _multi_lora_bwd_da_kernel(
    X, DS, PERM, TILES, RANKS, DA_PART, n_tiles, K, r_max,
    stride_xm, stride_xk, stride_dsm, stride_dsr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    p = tl.program_id(0)
    pid_k = tl.program_id(1)
    a, rows, pos_mask = _segment_tile(TILES, n_tiles, p, PERM, BLOCK_M)
    if a >= 0:
        r_a = tl.load(RANKS + a)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        k_mask = offs_k < K
        r_mask = offs_r < r_a
        x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=pos_mask[:, None] & k_mask[None, :], other=0.0)
        ds = tl.load(DS + rows[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     mask=pos_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(ds.to(x.dtype)), x, input_precision=DOT_PRECISION)
        # partials share the [tile, D, r] layout of dB's, so one segment-sum kernel serves both
        da_ptrs = DA_PART + p.to(tl.int64) * K * r_max + offs_k[None, :] * r_max + offs_r[:, None]
        tl.store(da_ptrs, acc, mask=r_mask[:, None] & k_mask[None, :])


@triton.jit
def _multi_lora_segment_sum_kernel(
    PART, TILE_CUM, RANKS, OFFS, OUT, D, r_max, stride_od, stride_or,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT[d, offs[a] + j] = Σ over adapter a's tiles t (in order) of PART[t, d, j], j < ranks[a]; zero if none."""
    a = tl.program_id(0)
    pid_d = tl.program_id(1)
    r_a = tl.load(RANKS + a)
    if r_a > 0:
        off = tl.load(OFFS + a).to(tl.int64)
        t0 = tl.load(TILE_CUM + a)
        t1 = tl.load(TILE_CUM + a + 1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_r = tl.arange(0, BLOCK_R)
        mask = (offs_d < D)[:, None] & (offs_r < r_a)[None, :]
        ptrs = PART + t0.to(tl.int64) * D * r_max + offs_d[:, None] * r_max + offs_r[None, :]
        acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        for _ in range(t0, t1):
            acc += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += D * r_max
        out_ptrs = OUT + offs_d[:, None].to(tl.int64) * stride_od + (off + offs_r[None, :]) * stride_or
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def multi_lora_shrink(x, ids, perm, a_pool, ranks, offsets, n_adapters: int, r_max: int) -> torch.Tensor:
    """S [M, r_max] in x's dtype: S[m, :r_a] = x_m·A_aᵀ for a = ids[m], zero elsewhere. perm: None or [M]."""
    M, K = x.shape
    cfg = skinny_config("shrink", r_max, x.dtype)
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    k_per, k_splits = split_blocks(triton.cdiv(K, cfg["BLOCK_K"]), m_blocks, target_programs(x.device))
    s = torch.empty((M, r_max), device=x.device, dtype=x.dtype)
    # small M: split K over programs (each used adapter's A is still read once) into fp32 partials
    part = s if k_splits == 1 else torch.empty((k_splits, M, r_max), device=x.device, dtype=torch.float32)
    stride_sp = 0 if k_splits == 1 else part.stride(0)
    _multi_lora_shrink_kernel[(m_blocks, k_splits)](
        x, ids, perm if perm is not None else ids, a_pool, ranks, offsets, part, M, K, n_adapters, r_max,
        k_per * cfg["BLOCK_K"],
        ids.stride(0), x.stride(0), x.stride(1), a_pool.stride(0), a_pool.stride(1), stride_sp, part.stride(-2), part.stride(-1),
        PERMUTED=perm is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(r_max),
        **tile_args(cfg), **launch_opts(cfg),
    )
    if k_splits > 1:
        s.copy_(part.sum(0))
    return s


def multi_lora_gemm(p_mat, q_t, l_mat, rm_t, bias, ids, scale, ranks, offsets, n_adapters: int, r_max: int, out=None):
    """out = P·Q + Σ_a scale[a]·L[rows of a, :r_a]·Rm_a + bias, q_t = Qᵀ [N, K], rm_t = pool Rmᵀ [N, R_total].

    scale None means 1 (L already scaled, as dS in backward). out: None or the [M, N] destination (any strides).
    """
    M, K = p_mat.shape
    N = q_t.shape[0]
    if out is None:
        out = torch.empty((M, N), device=p_mat.device, dtype=p_mat.dtype)
    q_kn = q_t.stride(1) != 1  # Q itself is row-major [K, N] (backward's W0) rather than [N, K]
    path = path_for(p_mat.device, q_t.t() if q_kn else q_t)
    cfg = gemm_config(M, p_mat.dtype, path)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _multi_lora_gemm_kernel[grid](
        p_mat, q_t, l_mat, rm_t, bias if bias is not None else out, out, ids,
        scale if scale is not None else out, ranks, offsets, M, N, K, n_adapters,
        p_mat.stride(0), p_mat.stride(1), q_t.stride(1), q_t.stride(0), l_mat.stride(0), l_mat.stride(1),
        rm_t.stride(1), rm_t.stride(0), out.stride(0), out.stride(1),
        ids.stride(0), bias.stride(0) if bias is not None else 0, scale.stride(0) if scale is not None else 0,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, EVEN_K=K % cfg["BLOCK_K"] == 0, DOT_PRECISION=dot_precision(p_mat.dtype), USE_TMA=path == "tma",
        Q_KN=q_kn, BLOCK_R=gemm_rank_block(r_max, cfg), **tile_args(cfg), **launch_opts(cfg),
    )
    return out


def _segment_sum(part, grouping, ranks, offsets, out, n_adapters: int, r_max: int, d: int, d_axis: int):
    cfg = skinny_config("segsum", r_max, out.dtype)
    r_axis = 1 - d_axis
    _multi_lora_segment_sum_kernel[(n_adapters, triton.cdiv(d, cfg["BLOCK_D"]))](
        part, grouping.tile_cum, ranks, offsets, out, d, r_max, out.stride(d_axis), out.stride(r_axis),
        BLOCK_D=cfg["BLOCK_D"], BLOCK_R=rank_block(r_max), **launch_opts(cfg),
    )


def multi_lora_bwd_dy(dy, b_pool, s, grouping: Grouping, scale, ranks, offsets, n_adapters, r_max, need_ds, need_db):
    """One read of dY: dS = s_a·dY·B_a (fp32 [M, r_max], rows of base-only tokens unwritten) and the
    per-adapter dB = s_a·dY_aᵀ·S_a summed into a zero-filled fp32 pool gradient [N, R_total]."""
    M, N = dy.shape
    cfg = skinny_config("dy", r_max, dy.dtype)
    assert cfg["BLOCK_M"] == grouping.block
    n_tiles = grouping.n_tiles
    n_per, n_splits = split_blocks(triton.cdiv(N, cfg["BLOCK_N"]), n_tiles, target_programs(dy.device))
    f32 = dict(device=dy.device, dtype=torch.float32)
    ds = ds_part = None
    if need_ds:
        ds = torch.empty((M, r_max), **f32)
        ds_part = ds if n_splits == 1 else torch.empty((n_splits, M, r_max), **f32)
    db_part = torch.empty((n_tiles, N, r_max), **f32) if need_db else None
    dummy = dy
    _multi_lora_bwd_dy_kernel[(n_tiles, n_splits)](
        dy, b_pool, s, grouping.perm, grouping.tiles, scale, ranks, offsets,
        ds_part if need_ds else dummy, db_part if need_db else dummy, n_tiles, N, r_max, n_per * cfg["BLOCK_N"],
        dy.stride(0), dy.stride(1), b_pool.stride(0), b_pool.stride(1), s.stride(0), s.stride(1),
        ds_part.stride(0) if need_ds and n_splits > 1 else 0, ds_part.stride(-2) if need_ds else 0, scale.stride(0),
        COMPUTE_DS=need_ds, COMPUTE_DB=need_db, DOT_PRECISION=dot_precision(dy.dtype), BLOCK_R=rank_block(r_max),
        **tile_args(cfg), **launch_opts(cfg),
    )
    if need_ds and n_splits > 1:
        torch.sum(ds_part, 0, out=ds)
    db = None
    if need_db:
        db = torch.zeros(b_pool.shape, **f32)  # pool columns of no adapter get a zero gradient
        _segment_sum(db_part, grouping, ranks, offsets, db, n_adapters, r_max, N, 0)
    return ds, db


def multi_lora_bwd_da(x, ds, a_pool_shape, grouping: Grouping, ranks, offsets, n_adapters, r_max):
    """Per-adapter dA = dS_aᵀ·x_a summed into a zero-filled fp32 pool gradient [R_total, K]."""
    M, K = x.shape
    cfg = skinny_config("da", r_max, x.dtype)
    assert cfg["BLOCK_M"] == grouping.block
    n_tiles = grouping.n_tiles
    part = torch.empty((n_tiles, K, r_max), device=x.device, dtype=torch.float32)
    _multi_lora_bwd_da_kernel[(n_tiles, triton.cdiv(K, cfg["BLOCK_K"]))](
        x, ds, grouping.perm, grouping.tiles, ranks, part, n_tiles, K, r_max,
        x.stride(0), x.stride(1), ds.stride(0), ds.stride(1),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(r_max), **tile_args(cfg), **launch_opts(cfg),
    )
    da = torch.zeros(a_pool_shape, device=x.device, dtype=torch.float32)
    _segment_sum(part, grouping, ranks, offsets, da, n_adapters, r_max, K, 1)
    return da


def multi_lora_linear_fwd(x, weight, a_pool, b_pool, bias, ids, table, grouping: Grouping | None, out):
    """Forward on 2-D x [M, K] (every tensor at any strides); ids [M] (signed int or uint8). Writes y into
    out [M, N] and returns S [M, r_max]."""
    n, r_max = table.n_adapters, table.max_rank
    perm = grouping.perm if grouping is not None else None
    s = multi_lora_shrink(x, ids, perm, a_pool, table.ranks, table.offsets, n, r_max)
    multi_lora_gemm(x, weight, s, b_pool, bias, ids, table.scalings, table.ranks, table.offsets, n, r_max, out=out)
    return s


def multi_lora_linear_bwd(dy, x, weight, a_pool, b_pool, s, ids, table, grouping: Grouping, needs):
    """Backward on 2-D tensors. needs = (dx, dA, dB); returns those three (None where not needed)."""
    need_dx, need_da, need_db = needs
    n, r_max = table.n_adapters, table.max_rank
    ds, db = multi_lora_bwd_dy(dy, b_pool, s, grouping, table.scalings, table.ranks, table.offsets, n, r_max,
                               need_dx or need_da, need_db)
    dx = da = None
    if need_dx:
        # dX = dY·W0 + dS_a·A_a per token: Q = W0 given as its transpose view, Rm = A pool likewise
        dx = multi_lora_gemm(dy, weight.t(), ds, a_pool.t(), None, ids, None, table.ranks, table.offsets, n, r_max)
    if need_da:
        da = multi_lora_bwd_da(x, ds, a_pool.shape, grouping, table.ranks, table.offsets, n, r_max).to(a_pool.dtype)
    if db is not None:
        db = db.to(b_pool.dtype)
    return dx, da, db
