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
    most SEG_BLOCK_M sorted tokens of one adapter; an adapter's tiles are consecutive) on a fixed number of
    programs along the tiles (kernels/common.py `reduction_programs`). Each program owns a column tile and a
    contiguous range of segment tiles and accumulates in registers while the adapter stays the same: a run
    that holds all of its adapter's tiles is stored into the pool gradient directly, the (at most two) runs
    cut by the range's ends go to the program's two fp32 partial slots, and `_multi_lora_seg_fixup_kernel`
    sums each cut adapter's slots in program order: deterministic, no atomics, and the partials bounded by
    [2·splits, D, r_max] (at most one such pair plus PARTIAL_BUDGET bytes), whatever M. dB reads dY a second
    time (the dY kernel computes dS alone).
    Sizes at M = 8192 tokens, 8 adapters, bf16, 132 SMs: the partials were one [D, r_max] per segment tile,
    [136, D, r_max] (cdiv(M, 64) + 8 tiles): 136 MiB for dB at N = 4096, r_max = 64, and 731 MiB at
    N = 11008, r_max = 128 (dA alike with K). Now [2·splits, D, r_max] with splits = 2 (N = 4096, r_max = 64:
    BLOCK_D = 16, so 256 column tiles and 2 programs wanted, within the budget's 1 + 4 MiB / 2 MiB): 4 MiB;
    at N = 11008, r_max = 128: 688 column tiles, splits = 1: no partial at all (every run goes to the output).

Kernels (x [M, K], W0 [N, K]):
  _multi_lora_shrink_kernel      S[m, :r_a] = x_m·A_aᵀ            [M, R_MAX], split-K partials for small M
  _multi_lora_gemm_kernel        out = P·Q + Σ_a c_a·L_a·Rm_a + bias  forward: P=x, Q=W0ᵀ, L=S, Rm=B_aᵀ, c=s_a
                                                                      backward: P=dY, Q=W0, L=dS, Rm=A_a, c=1
                                 HAS_BASE=False: without P·Q, the cuBLAS backend's C (ops/multi_lora_cublas.py)
  _multi_lora_bwd_dy_kernel      dS = s_a·dY·B_a per segment tile
  _multi_lora_seg_reduce_kernel  OUT_a = c_a·U_aᵀ·V_a per adapter, over ranges of segment tiles
                                 dB: U = dY, V = S, c = s_a;  dA: U = x, V = dS, c = 1
  _multi_lora_seg_fixup_kernel   per adapter cut by the ranges: Σ of its partial slots, into the pool gradient

Argument legend: P, Q, L, RM as in kernels/lora_linear.py (the K loop is kernels/gemm_loop.py's); IDS the
adapter id of every token, PERM the token rows sorted by adapter, TILES the segment tiles (`Grouping`),
RANKS / OFFS each adapter's rank and first row in the pool, SCALE its scaling; r_max the pool's largest
rank; n_adapters the pool size; *_PART fp32 partials; U, V the reduction's operands (D the length of U's rows);
TILE_CUM each adapter's first segment tile; stride_<t><d> tensor t's stride along dimension d.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (  # noqa: F401 (rank_block, tiles_for: re-exported for the tests)
    dot_precision, grouped_tile, launch_opts, path_for, rank_block, reduction_programs, split_even, tile_args,
    tiles_for,
)
from .. import autotune
from . import gemm_tuning as _tuning  # tunable: tests replace it there
from .gemm_loop import gemm_k_loop
from .multi_lora_configs import (  # noqa: F401 (the tables, re-exported: fastpeft.kernels.multi_lora.*)
    DECODE_M, EXPAND_CONFIGS, GEMM_CANDIDATES, GEMM_CONFIGS, INTERPRETER_CONFIGS, INTERPRETER_SEG_BLOCK_M, MAX_RANK,
    SEG_BLOCK_M, SKINNY_CONFIGS, expand_config, expand_config_name, gemm_candidates, gemm_config, gemm_config_name,
    gemm_rank_block, rank_bucket, seg_block_m, skinny_config,
)

OP = "multi_lora_gemm"  # its decisions in backend_report()["autotune"]
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
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BASE: tl.constexpr, EVEN_K: tl.constexpr,
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

    if HAS_BASE:  # x / dY / y through pointers (rows in token order), W0 through a tensor descriptor on Hopper
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
    DY, B, PERM, TILES, SCALE, RANKS, OFFS, DS, n_tiles, N, r_max, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_dsp, stride_dsm, stride_scale,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
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
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            dy = tl.load(DY + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=pos_mask[:, None] & n_mask[None, :], other=0.0)
            b = tl.load(B + offs_n[:, None].to(tl.int64) * stride_bn + (off + offs_r[None, :]) * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            ds = tl.dot(dy, b.to(dy.dtype), ds, input_precision=DOT_PRECISION)
        ds_ptrs = DS + pid_s.to(tl.int64) * stride_dsp + rows[:, None] * stride_dsm + offs_r[None, :]
        tl.store(ds_ptrs, ds * scale, mask=pos_mask[:, None] & (offs_r < r_max)[None, :])


@triton.jit
def _flush_run(acc, a, run_start, run_end, t_lo, slot_base, TILE_CUM, RANKS, OFFS, SCALE, OUT, PART, offs_d, d_mask,
               offs_r, D, r_max, stride_od, stride_or, stride_scale, HAS_SCALE: tl.constexpr):
    """Store adapter a's run of segment tiles [run_start, run_end): into OUT when it holds all of a's tiles, else
    into the program's slot 0 (the run starts the program's range) or slot 1 (it ends it)."""
    if a >= 0:
        r_a = tl.load(RANKS + a)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + a * stride_scale).to(tl.float32)
        mask = d_mask[:, None] & (offs_r < r_a)[None, :]
        if (run_start == tl.load(TILE_CUM + a)) & (run_end == tl.load(TILE_CUM + a + 1)):
            off = tl.load(OFFS + a).to(tl.int64)
            out_ptrs = OUT + offs_d[:, None].to(tl.int64) * stride_od + (off + offs_r[None, :]) * stride_or
            tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
        else:
            slot = slot_base + (run_start != t_lo).to(tl.int64)
            tl.store(PART + slot * D * r_max + offs_d[:, None] * r_max + offs_r[None, :], acc, mask=mask)


@triton.jit
def _multi_lora_seg_reduce_kernel(
    U, V, PERM, TILES, TILE_CUM, RANKS, OFFS, SCALE, OUT, PART, n_tiles, tiles_per_split, D, r_max,
    stride_um, stride_ud, stride_vm, stride_vr, stride_od, stride_or, stride_scale,
    HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """OUT[d, offs[a] + j] = c_a·Σ_(rows m of a) U[m, d]·V[m, j] for one column tile of U and one contiguous range
    of segment tiles; the accumulator stays in registers over each adapter's run (see `_flush_run`). PART is
    [2·splits, D, r_max]."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_r = tl.arange(0, BLOCK_R)
    t_lo = pid_s * tiles_per_split
    t_hi = min(n_tiles, t_lo + tiles_per_split)
    slot_base = 2 * pid_s.to(tl.int64)
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    cur = tl.load(TILES + t_lo)
    run_start = t_lo
    for t in range(t_lo, t_hi):
        a, rows, pos_mask = _segment_tile(TILES, n_tiles, t, PERM, BLOCK_M)
        if a != cur:
            _flush_run(acc, cur, run_start, t, t_lo, slot_base, TILE_CUM, RANKS, OFFS, SCALE, OUT, PART, offs_d,
                       d_mask, offs_r, D, r_max, stride_od, stride_or, stride_scale, HAS_SCALE)
            acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
            cur = a
            run_start = t
        if a >= 0:
            r_a = tl.load(RANKS + a)
            u = tl.load(U + rows[:, None] * stride_um + offs_d[None, :] * stride_ud,
                        mask=pos_mask[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(V + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                        mask=pos_mask[:, None] & (offs_r < r_a)[None, :], other=0.0)
            acc = tl.dot(tl.trans(u), v.to(u.dtype), acc, input_precision=DOT_PRECISION)
    _flush_run(acc, cur, run_start, t_hi, t_lo, slot_base, TILE_CUM, RANKS, OFFS, SCALE, OUT, PART, offs_d, d_mask,
               offs_r, D, r_max, stride_od, stride_or, stride_scale, HAS_SCALE)


@triton.jit
def _multi_lora_seg_fixup_kernel(
    PART, TILE_CUM, RANKS, OFFS, OUT, tiles_per_split, D, r_max, stride_od, stride_or,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """For adapter a whose segment tiles span the ranges of programs g0 < g1: OUT = Σ over g0..g1, in order, of
    each program's slot holding a's run (slot 1 of g0 unless a's tiles start g0's range, slot 0 after)."""
    a = tl.program_id(0)
    pid_d = tl.program_id(1)
    r_a = tl.load(RANKS + a)
    t0 = tl.load(TILE_CUM + a)
    t1 = tl.load(TILE_CUM + a + 1)
    if (r_a > 0) & (t1 > t0):
        g0 = t0 // tiles_per_split
        g1 = (t1 - 1) // tiles_per_split
        if g1 > g0:
            off = tl.load(OFFS + a).to(tl.int64)
            offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            offs_r = tl.arange(0, BLOCK_R)
            mask = (offs_d < D)[:, None] & (offs_r < r_a)[None, :]
            rel = offs_d[:, None] * r_max + offs_r[None, :]
            first = 2 * g0.to(tl.int64) + (t0 != g0 * tiles_per_split).to(tl.int64)
            acc = tl.load(PART + first * D * r_max + rel, mask=mask, other=0.0)
            ptrs = PART + (2 * g0.to(tl.int64) + 2) * D * r_max + rel  # slot 0 of g0 + 1, then every second slot
            for _ in range(g0 + 1, g1 + 1):
                acc += tl.load(ptrs, mask=mask, other=0.0)
                ptrs += 2 * D * r_max
            out_ptrs = OUT + offs_d[:, None].to(tl.int64) * stride_od + (off + offs_r[None, :]) * stride_or
            tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers


def multi_lora_shrink(x, ids, perm, a_pool, ranks, offsets, n_adapters: int, r_max: int) -> torch.Tensor:
    """S [M, r_max] in x's dtype: S[m, :r_a] = x_m·A_aᵀ for a = ids[m], zero elsewhere. perm: None or [M]."""
    M, K = x.shape
    cfg = skinny_config("shrink", r_max, x.dtype)
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    # (partials [k_splits, M, r_max]: at most one output plus PARTIAL_BUDGET, kernels/common.py)
    k_blocks = triton.cdiv(K, cfg["BLOCK_K"])
    k_per, k_splits = split_even(k_blocks, reduction_programs(x.device, k_blocks, m_blocks, 4 * M * r_max))
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


def multi_lora_gemm(p_mat, q_t, l_mat, rm_t, bias, ids, scale, ranks, offsets, n_adapters: int, r_max: int, out=None,
                    tuned=None):
    """out = P·Q + Σ_a scale[a]·L[rows of a, :r_a]·Rm_a + bias, q_t = Qᵀ [N, K], rm_t = pool Rmᵀ [N, R_total].

    scale None means 1 (L already scaled, as dS in backward). out: None or the [M, N] destination (any strides).
    The config: measured on CUDA tensors (kernels/gemm_tuning.py), else the interpreter's; tuned = (path,
    config) forces both (the timing runs).
    """
    M, K = p_mat.shape
    N = q_t.shape[0]
    if out is None:
        out = torch.empty((M, N), device=p_mat.device, dtype=p_mat.dtype)
    q_kn = q_t.stride(1) != 1  # Q itself is row-major [K, N] (backward's W0) rather than [N, K]
    if tuned is not None:
        path, cfg = tuned
    else:
        path = path_for(p_mat.device, q_t.t() if q_kn else q_t)
        if _tuning.tunable(p_mat.device):
            cfg = _tuning.tuned_config(
                OP, _gemm_key(p_mat, N, r_max, path, q_kn, bias, scale), p_mat.device,
                gemm_candidates(M, p_mat.dtype, path),
                lambda g: tuple(_tuning.fresh_like(t, g)
                                for t in (p_mat, q_t, l_mat, rm_t, bias, ids, scale, ranks, offsets, out)),
                lambda t, cfg: multi_lora_gemm(*t[:9], n_adapters, r_max, out=t[9], tuned=(path, cfg)))
        else:
            cfg = gemm_config(M, p_mat.dtype, path)
    _launch_gemm(p_mat, q_t, l_mat, rm_t, bias, ids, scale, ranks, offsets, n_adapters, r_max, out,
                 cfg, path == "tma", q_kn, True)
    return out


def _gemm_key(p_mat, N, r_max, path, q_kn, bias, scale) -> tuple:
    """The tuning key: dtype, path, rows bucketed, N, K, the pool's rank bucket (the epilogue's rank chunk) and
    the kernel's variant flags. The adapter mix of the first call's ids is what is timed (a copy of them)."""
    M, K = p_mat.shape
    return (p_mat.dtype, path, f"m{autotune.m_bucket(M)}", f"n{N}", f"k{K}", f"r{autotune.r_bucket(r_max)}",
            "q_kn" if q_kn else "q_nk", "bias" if bias is not None else "nobias",
            "scale" if scale is not None else "noscale")


def _describe(key: tuple, choice: str) -> dict:
    """The chosen config's tiles, for backend_report()["autotune"] (autotune.set_describer)."""
    dtype, path, mb = key[:3]
    return dict(gemm_candidates(int(mb[1:]), dtype, path).get(choice, {}))


autotune.set_describer(OP, _describe)


def multi_lora_expand(l_mat, rm_t, bias, ids, scale, ranks, offsets, n_adapters: int, r_max: int, out):
    """out [M, N] (any strides) = Σ_a scale[a]·L[rows of a, :r_a]·Rm_a + bias: _multi_lora_gemm_kernel without its
    K loop (HAS_BASE=False), the low-rank term written once as the C input of cuBLAS's GEMM
    (fastpeft/ops/multi_lora_cublas.py). Both factors are cast to out's dtype before the fp32 dot, as the fused
    GEMM casts them to x's (or dY's), so the two backends round the low-rank term alike."""
    M = out.shape[0]
    _launch_gemm(out, out, l_mat, rm_t, bias, ids, scale, ranks, offsets, n_adapters, r_max, out,
                 expand_config(M, out.dtype), False, False, False)
    return out


def _launch_gemm(p_mat, q_t, l_mat, rm_t, bias, ids, scale, ranks, offsets, n_adapters, r_max, out, cfg, use_tma,
                 q_kn, has_base):
    M, N = out.shape
    K = p_mat.shape[1] if has_base else 0  # without the base GEMM, P and Q are never read (out stands in)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _multi_lora_gemm_kernel[grid](
        p_mat, q_t, l_mat, rm_t, bias if bias is not None else out, out, ids,
        scale if scale is not None else out, ranks, offsets, M, N, K, n_adapters,
        p_mat.stride(0), p_mat.stride(1), q_t.stride(1), q_t.stride(0), l_mat.stride(0), l_mat.stride(1),
        rm_t.stride(1), rm_t.stride(0), out.stride(0), out.stride(1),
        ids.stride(0), bias.stride(0) if bias is not None else 0, scale.stride(0) if scale is not None else 0,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_BASE=has_base, EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_PRECISION=dot_precision(p_mat.dtype), USE_TMA=use_tma, Q_KN=q_kn, BLOCK_R=gemm_rank_block(r_max, cfg),
        **tile_args(cfg), **launch_opts(cfg),
    )


def seg_reduce_programs(device, n_tiles: int, d_tiles: int, D: int, r_max: int) -> tuple[int, int]:
    """(segment tiles per split, splits) of _multi_lora_seg_reduce_kernel: reduction_programs over the segment
    tiles, each program with a [2, D, r_max] pair of partial slots."""
    return split_even(n_tiles, reduction_programs(device, n_tiles, d_tiles, 2 * 4 * D * r_max))


def _seg_reduce(u, v, grouping: Grouping, scale, ranks, offsets, out, n_adapters: int, r_max: int, d_axis: int):
    """out (zero-filled fp32 pool gradient; its dimension d_axis runs along U's columns) = per adapter
    c_a·U_aᵀ·V_a over the adapter's tokens (module docstring)."""
    D = u.shape[1]
    cfg = skinny_config("red", r_max, u.dtype)
    assert cfg["BLOCK_M"] == grouping.block
    d_tiles = triton.cdiv(D, cfg["BLOCK_D"])
    per, splits = seg_reduce_programs(u.device, grouping.n_tiles, d_tiles, D, r_max)
    # one program along the tiles: every run holds all of its adapter's tiles and goes to out (no slots)
    part = torch.empty((2 * splits, D, r_max), device=u.device, dtype=torch.float32) if splits > 1 else out
    r_axis = 1 - d_axis
    _multi_lora_seg_reduce_kernel[(d_tiles, splits)](
        u, v, grouping.perm, grouping.tiles, grouping.tile_cum, ranks, offsets, scale if scale is not None else out,
        out, part, grouping.n_tiles, per, D, r_max,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(d_axis), out.stride(r_axis),
        scale.stride(0) if scale is not None else 0,
        HAS_SCALE=scale is not None, DOT_PRECISION=dot_precision(u.dtype), BLOCK_R=rank_block(r_max),
        **tile_args(cfg), **launch_opts(cfg),
    )
    if splits > 1:
        fix = skinny_config("fixup", r_max, out.dtype)
        _multi_lora_seg_fixup_kernel[(n_adapters, triton.cdiv(D, fix["BLOCK_D"]))](
            part, grouping.tile_cum, ranks, offsets, out, per, D, r_max, out.stride(d_axis), out.stride(r_axis),
            BLOCK_D=fix["BLOCK_D"], BLOCK_R=rank_block(r_max), **launch_opts(fix),
        )


def multi_lora_bwd_dy(dy, b_pool, s, grouping: Grouping, scale, ranks, offsets, n_adapters, r_max, need_ds, need_db):
    """dS = s_a·dY·B_a (fp32 [M, r_max], rows of base-only tokens unwritten) and the per-adapter
    dB = s_a·dY_aᵀ·S_a summed into a zero-filled fp32 pool gradient [N, R_total] (a second read of dY).
    Temporaries: the dS column-split partials [n_splits, M, r_max] (reduction_programs: at most one output plus
    PARTIAL_BUDGET) and the dB slots of _seg_reduce."""
    M, N = dy.shape
    cfg = skinny_config("dy", r_max, dy.dtype)
    assert cfg["BLOCK_M"] == grouping.block
    n_tiles = grouping.n_tiles
    f32 = dict(device=dy.device, dtype=torch.float32)
    ds = None
    if need_ds:
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        n_per, n_splits = split_even(n_blocks, reduction_programs(dy.device, n_blocks, n_tiles, 4 * M * r_max))
        ds = torch.empty((M, r_max), **f32)
        ds_part = ds if n_splits == 1 else torch.empty((n_splits, M, r_max), **f32)
        _multi_lora_bwd_dy_kernel[(n_tiles, n_splits)](
            dy, b_pool, grouping.perm, grouping.tiles, scale, ranks, offsets, ds_part, n_tiles, N, r_max,
            n_per * cfg["BLOCK_N"],
            dy.stride(0), dy.stride(1), b_pool.stride(0), b_pool.stride(1),
            ds_part.stride(0) if n_splits > 1 else 0, ds_part.stride(-2), scale.stride(0),
            DOT_PRECISION=dot_precision(dy.dtype), BLOCK_R=rank_block(r_max), **tile_args(cfg), **launch_opts(cfg),
        )
        if n_splits > 1:
            torch.sum(ds_part, 0, out=ds)
    db = None
    if need_db:
        db = torch.zeros(b_pool.shape, **f32)  # pool columns of no adapter get a zero gradient
        _seg_reduce(dy, s, grouping, scale, ranks, offsets, db, n_adapters, r_max, 0)
    return ds, db


def multi_lora_bwd_da(x, ds, a_pool_shape, grouping: Grouping, ranks, offsets, n_adapters, r_max):
    """Per-adapter dA = dS_aᵀ·x_a summed into a zero-filled fp32 pool gradient [R_total, K] (_seg_reduce)."""
    da = torch.zeros(a_pool_shape, device=x.device, dtype=torch.float32)
    _seg_reduce(x, ds, grouping, None, ranks, offsets, da, n_adapters, r_max, 1)
    return da


def multi_lora_linear_fwd(x, weight, a_pool, b_pool, bias, ids, table, grouping: Grouping | None, out):
    """Forward on 2-D x [M, K] (every tensor at any strides); ids [M] (signed int or uint8). Writes y into
    out [M, N] and returns S [M, r_max]."""
    n, r_max = table.n_adapters, table.max_rank
    perm = grouping.perm if grouping is not None else None
    s = multi_lora_shrink(x, ids, perm, a_pool, table.ranks, table.offsets, n, r_max)
    multi_lora_gemm(x, weight, s, b_pool, bias, ids, table.scalings, table.ranks, table.offsets, n, r_max, out=out)
    return s


def multi_lora_linear_bwd(dy, x, weight, a_pool, b_pool, s, ids, table, grouping: Grouping, needs, dx_fn=None):
    """Backward on 2-D tensors. needs = (dx, dA, dB); returns those three (None where not needed).
    dx_fn(dy, weight, a_pool, ds, ids, table) -> dX replaces the fused dX GEMM (the cuBLAS backend's)."""
    need_dx, need_da, need_db = needs
    n, r_max = table.n_adapters, table.max_rank
    ds, db = multi_lora_bwd_dy(dy, b_pool, s, grouping, table.scalings, table.ranks, table.offsets, n, r_max,
                               need_dx or need_da, need_db)
    dx = da = None
    if need_dx and dx_fn is not None:
        dx = dx_fn(dy, weight, a_pool, ds, ids, table)
    elif need_dx:
        # dX = dY·W0 + dS_a·A_a per token: Q = W0 given as its transpose view, Rm = A pool likewise
        dx = multi_lora_gemm(dy, weight.t(), ds, a_pool.t(), None, ids, None, table.ranks, table.offsets, n, r_max)
    if need_da:
        da = multi_lora_bwd_da(x, ds, a_pool.shape, grouping, table.ranks, table.offsets, n, r_max).to(a_pool.dtype)
    if db is not None:
        db = db.to(b_pool.dtype)
    return dx, da, db
