"""Decode (M <= 16 rows): the LoRA linear forward in one launch, the shrink fused into a GEMV-style kernel.

  _lora_decode_kernel   y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ, S = dropout(x)·Aᵀ·(1/(1-p)) ([M, R], x's dtype)

Each program owns BLOCK_N output columns and loops over the whole of K: each x tile is loaded once and feeds
both x·W0ᵀ (an fp32 [16, BLOCK_N] accumulator) and dropout(x)·Aᵀ (an fp32 [16, BLOCK_R] one, A's columns read
in the same loop). The epilogue rounds S to x's dtype and adds s·S·B_tileᵀ and the bias; program 0 stores S.
S is what _lora_shrink_kernel (kernels/lora_linear.py) stores, the same mask (dropout_keep over x's [16, BLOCK_K]
tiles at rows 0.., columns k0..) and the same rounding (fp32 sum, times 1/(1-p), to x's dtype), so the backward
is unchanged; y takes that rounded S, as the two-launch GEMM does. Rows are padded to 16 (tl.dot's minimum):
tensor cores at M = 1 do 16x the useful MACs, which a memory-bound pass does not notice (below).

No split-K. A deterministic one-launch split-K needs a last-arriving program to sum the partials in a fixed
order, i.e. a zeroed semaphore per column tile that outlives the launch: a persistent buffer that two streams
(or a CUDA graph replayed beside eager calls) would share and corrupt silently. Instead cdiv(N, BLOCK_N) fills
the GPU: BLOCK_N = 32 up to rank 64 (N = 4096: 128 programs on 132 SMs; 11008: 344), 64 for ranks 128 and 256
in 16-bit (DECODE_CONFIGS).

Bytes (e = element size): W0 N·K·e dominates and is read once from HBM; A, B (R·K·e, N·R·e) once from HBM; x
and y M·K·e, M·N·e. Every program re-reads x's rows and all of A (R rows; padded ranks are not fetched) from
L2: cdiv(N, BLOCK_N)·R·K·e, i.e. R/BLOCK_N of W0's bytes, beside W0's own passage through L2. N = K = 4096,
r = 16, bf16, H200: W0 32 MiB from HBM, A 16 MiB from L2 (half of W0's bytes at ~2.5x HBM's bandwidth: a
fifth of W0's time, overlapped); x 1 MiB from L2. r = 64: 2x W0; r = 256: 4x W0 (BLOCK_N 64), where two
launches (A read once) would read less; the decode kernel still takes every M <= 16 (one launch). If a GPU
shows L2 contention at low rank, BLOCK_N = 64 halves it at the price of idle SMs at N = 4096.

Predicted at M = 1, 4096 x 4096, r = 16, bf16, H200 (4.8 TB/s): W0 33.55 MB + A 0.13 + B 0.13 + x, y 0.02 =
33.83 MB -> 7.05 µs at full bandwidth; the frozen Linear (cuBLAS GEMV) 33.57 MB -> 6.99 µs: 1.008x in bytes,
so ~1.0-1.05x at equal achieved bandwidth (~8 µs each at ~88%), against the target of <= 1.10x. Two launches
today add a second kernel (~2-3 µs: launch, tail, S round trip) to the same bytes. Not measured (no GPU here).

Dropout: every program regenerates the whole [16, K] mask, 16 rows whatever M (Philox, one call per 4
elements): cdiv(N, BLOCK_N)·4·K calls, about 2M at the shape above, some µs of ALU spread over the SMs beside the
memory time. Decode with dropout is training at a tiny batch; inference (p = 0) compiles without it.

Argument legend as in kernels/lora_linear.py: X [M, K], W [N, K] (W0), A [R, K], B [N, R], Y [M, N], S [M, R];
stride_<t><d> is tensor t's stride along dimension d; the seed an int or, with SEED_PTR, a 0-d int64 tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, interpreting, launch_opts, path_for, rank_block, tile_args, tiles_for
from .launch import _launch, seed_arg  # the launch helper that also loads the tensor-seed variant (CUDA graphs)
from .philox import dropout_keep, dropout_seed

# Rows the decode kernel takes (tl.dot's minimum M: the row tile, padded).
DECODE_MAX_ROWS = 16

# Tiles by padded rank (decode_rank_block), as the skinny kernels' (kernels/lora_linear_configs.py). Up to rank
# 64, 32 columns a program, so that cdiv(N, 32) fills the GPU at typical N (4096: 128 programs, 11008: 344, on
# 132 SMs); ranks 128 and 256 take 64 columns in 16-bit, halving A's L2 re-reads (R/BLOCK_N of W0's bytes) at the
# price of idle SMs at N = 4096. Long K tiles and deep pipelines keep W0 bytes in flight for a memory-bound pass
# (6 stages: 48 KiB of W0 per SM, 106 KiB of shared memory); the [BLOCK_K, BLOCK_R] A tile, the [16, BLOCK_R]
# accumulator and the epilogue's [BLOCK_R, BLOCK_N] B tile bound them at high rank. The pointer path holds
# address tensors in registers: shorter K tiles, 8 warps. "fp32": 4-byte tiles, K halved, and at high rank 32
# columns (the B tile). "ieee" (fp32 at full precision): FMA dots hold each thread's rows and columns over the
# whole reduction (the epilogue's is BLOCK_R long) in registers: short K tiles.
_TMA_LOW = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=6, fp32=dict(BLOCK_N=32, BLOCK_K=64),
                ieee=dict(BLOCK_K=16))
_TMA_HIGH = dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3, fp32=dict(BLOCK_N=32, BLOCK_K=32),
                 ieee=dict(BLOCK_K=8))
_PTR_LOW = dict(BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3, fp32=dict(BLOCK_N=32, BLOCK_K=32),
                ieee=dict(BLOCK_K=16))
_PTR_HIGH = dict(BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3, fp32=dict(BLOCK_N=32, BLOCK_K=16),
                 ieee=dict(BLOCK_K=8))
DECODE_CONFIGS = {
    "tma": {32: _TMA_LOW, 64: dict(_TMA_LOW, num_stages=4, ieee=dict(BLOCK_K=8, num_warps=8)),
            # ieee at rank 128: 64 columns (32 spill; the allocator is not monotone in the tile)
            128: dict(_TMA_HIGH, ieee=dict(BLOCK_N=64, BLOCK_K=8)), 256: _TMA_HIGH},
    "ptr": {32: _PTR_LOW, 64: _PTR_LOW, 128: _PTR_HIGH, 256: dict(_PTR_HIGH, BLOCK_K=16)},
}
# Under the interpreter: small tiles, so odd test shapes span several column and K tiles.
INTERPRETER_CONFIG = dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)


def decode_rank_block(R: int) -> int:
    """BLOCK_R: the padded rank, at least 32 (a [16, 16] accumulator beside the others took more registers than a
    [16, 32] one, and the wasted columns cost nothing in a memory-bound pass; one config fewer to compile)."""
    return max(32, rank_block(R))


def decode_config(R: int, dtype: torch.dtype, path: str) -> dict:
    if interpreting():
        return dict(INTERPRETER_CONFIG)
    return tiles_for(DECODE_CONFIGS[path][decode_rank_block(R)], dtype)


@triton.jit(do_not_specialize=["seed", "thr"])
def _lora_decode_kernel(
    X, W, A, B, BIAS, Y, S, M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bias,
    lora_scale, seed, thr, drop_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # wrapped rows/columns/ranks keep the loads in bounds without masks; the stores drop them (and B's masked
    # rows zero the wrapped ranks' columns of S in the epilogue)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    ranks = offs_r % R
    if HAS_DROPOUT:
        key = dropout_seed(seed, SEED_PTR)
    if USE_TMA:  # x, W0 and A through the tensor-memory accelerator: no address registers, zero fill past the edges
        x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
        a_desc = tl.make_tensor_descriptor(A, shape=[R, K], strides=[stride_ar, 1], block_shape=[BLOCK_R, BLOCK_K])
    else:
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
        a_ptrs = A + offs_k[:, None] * stride_ak + ranks[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if USE_TMA:
            x = x_desc.load([0, k0])
            w = w_desc.load([pid * BLOCK_N, k0]).T
            a = a_desc.load([0, k0]).T
        elif EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
            a = tl.load(a_ptrs)
        else:
            k_mask = offs_k < K - k0
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            a = tl.load(a_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:  # the shrink's mask: rows 0.., columns k0.. of x
            x = tl.where(dropout_keep(key, offs_m, k0, thr, BLOCK_M, BLOCK_K), x, 0.0)
        acc_s = tl.dot(x, a.to(x.dtype), acc_s, input_precision=DOT_PRECISION)
        if not USE_TMA:
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc_s = acc_s * drop_scale
    s_lo = acc_s.to(S.dtype.element_ty)  # S as stored: the epilogue multiplies what backward will read
    if pid == 0:
        s_ptrs = S + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
        tl.store(s_ptrs, s_lo, mask=(offs_m < M)[:, None] & r_mask[None, :])
    b = tl.load(B + ranks[:, None] * stride_br + cols[None, :] * stride_bn, mask=r_mask[:, None], other=0.0)
    low = tl.dot(s_lo, b.to(S.dtype.element_ty), input_precision=DOT_PRECISION)
    acc += low * lora_scale
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    if USE_TMA:
        y_desc = tl.make_tensor_descriptor(Y, shape=[M, N], strides=[stride_ym, 1], block_shape=[BLOCK_M, BLOCK_N])
        y_desc.store([0, pid * BLOCK_N], acc.to(Y.dtype.element_ty))
    else:
        y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def lora_decode(x, weight, lora_a, lora_b, bias, scaling: float, p: float, seed, thr: int):
    """(y [M, N], S [M, R]) in x's dtype for 1 <= M <= DECODE_MAX_ROWS and N >= 1, in one launch: what
    lora_shrink then lora_gemm return. Any strides (bias [N] too); seed an int or a tensor (seed_arg)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s = torch.empty((M, R), device=x.device, dtype=x.dtype)
    path = path_for(x.device, x, weight, lora_a, y)
    cfg = decode_config(R, x.dtype, path)
    seed, seed_ptr = seed_arg(seed, x.device) if p > 0 else (0, False)
    _launch(
        _lora_decode_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),),
        x, weight, lora_a, lora_b, bias if bias is not None else y, y, s, M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), s.stride(0), s.stride(1),
        bias.stride(0) if bias is not None else 0, scaling,
        seed=seed, thr=thr, drop_scale=1.0 / (1.0 - p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, SEED_PTR=seed_ptr, EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_PRECISION=dot_precision(x.dtype), USE_TMA=path == "tma", BLOCK_M=DECODE_MAX_ROWS,
        BLOCK_R=decode_rank_block(R), **tile_args(cfg), **launch_opts(cfg),
    )
    return y, s
