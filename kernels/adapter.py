"""Fused bottleneck adapter: y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu), Triton kernels and their launchers.

x [M, D] is the adapter's input, r [M, D] the residual (the same tensor as x for a series adapter),
Wd [A, D] the down-projection, Wu [D, A] the up-projection, s a scalar.

Forward, one kernel per block of rows (`_adapter_kernel`): stream x over D into the fp32 bottleneck
accumulator Z [BM, A], add bd, store Z (fp32, the only tensor saved besides x), apply the activation,
then stream over D again: up-projection, bu, scale, skip add, one write of y. The second pass reads r
(= x for a series adapter, then mostly from L2).

Backward, two kernels:
  `_adapter_bwd_dz_kernel` (row blocks): dZ = s·(dY·Wu) ⊙ act'(Z), reading dY once; writes dZ and act(Z)
  [M, A] in the activations' dtype (the dtype the second kernel multiplies them in) and per-row-block fp32
  partials of dbd = Σ dZ.
  `_adapter_bwd_kernel` (column tiles of D × splits of M): reads dY and x once more and writes dX
  once: dX = dZ·Wd (+ dY for a series adapter), and per-split fp32 partials of dWu = s·dYᵀ·act(Z),
  dWd = dZᵀ·x, dbu = s·Σ dY. The partials are summed afterwards in a fixed order: deterministic, no
  float atomics. The math needs dY twice (dZ must be complete before dX and dWd can start), x once.
Bounded temporaries (kernels/common.py PARTIAL_BUDGET, 4 MiB): the dbd partials, one row per row block, are
written for row chunks of at most 1 + PARTIAL_BUDGET / (4·A) row blocks into one reused buffer and summed chunk
by chunk (at M = 8192, A = 64: [128, 64], 32 KiB, before and after; the bound matters only past a million
rows); the splits of M are also capped so that the dWu/dWd/dbu partials take at most one output plus the budget
(at D = 4096, 132 SMs, bf16: A = 64, 4 splits = 2 × 4 MiB before, 2 splits = 2 × 2 MiB now; A = 256, 4 splits
= 2 × 16 MiB before, 1 split (the outputs themselves, 2 × 4 MiB) now; D = 11008, A = 64: 1 split before and now).

Argument legend: X, R, Y as above; WD / BD the down-projection and its bias, WU / BU the up-projection and
its bias; Z the pre-activation bottleneck, ACTZ act(Z); DY, DZ, DX the gradients; PBD, PWU, PWD, PBU fp32
partials of the bias and weight gradients; D the model width, A the bottleneck width (BLOCK_A its padded
tile); stride_<t>_<d> tensor t's stride along dimension d.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..limits import ADAPTER_MAX_BOTTLENECK_TRITON
from ..ops.adapter_torch import ACTIVATIONS
from . import common as _common  # PARTIAL_BUDGET, read at each launch (tests lower it)
from .common import dot_precision, fma_dots, interpreting, launch_opts, tile_args, tiles_for

ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}
MAX_BOTTLENECK = ADAPTER_MAX_BOTTLENECK_TRITON  # fastpeft/limits.py

# constants inline in the jit functions: 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2*pi) = 0.3989422804014327,
# sqrt(2/pi) = 0.7978845608028654, and the tanh-GELU cubic coefficient 0.044715

# GPU configurations per kernel and bottleneck bucket (padded width <= 64, or <= 256). Every entry is
# compiled by tests/test_adapter.py for sm_90 and sm_80 (no spills, tensor cores); fp32 inputs halve the
# D tile (`gpu_config`), and fp32 with FMA dots ("ieee", whose operands take registers over the whole
# reduction tile) takes the entry's "ieee" tiles. Untuned beyond that: measured tuning on a GPU is owed.
# Register budget: the dots of one kernel share one warp layout with every warp along M, so each warp holds
# a dot's whole B operand ([K, N]); the tiles keep those operands small rather than the accumulators.
CONFIGS = {
    "fwd": {64: dict(BLOCK_M=64, BLOCK_D=64, num_warps=8, num_stages=2),
            256: dict(BLOCK_M=32, BLOCK_D=32, num_warps=8, num_stages=2)},
    "dz": {64: dict(BLOCK_M=64, BLOCK_D=64, num_warps=8, num_stages=3),
           256: dict(BLOCK_M=32, BLOCK_D=32, num_warps=8, num_stages=3, ieee=dict(BLOCK_D=16))},
    # A_CHUNK: the bottleneck chunk of dX = dZ·Wd (see the kernel)
    "bwd": {64: dict(BLOCK_M=32, BLOCK_D=32, A_CHUNK=64, num_warps=8, num_stages=2, ieee=dict(BLOCK_D=16)),
            256: dict(BLOCK_M=16, BLOCK_D=32, A_CHUNK=64, num_warps=8, num_stages=2, ieee=dict(BLOCK_D=16))},
}
# Under the interpreter: small tiles so that the tests' small shapes cover several tiles and tails.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_D=16, A_CHUNK=16, num_warps=1, num_stages=1)


def block_a(a: int) -> int:
    """Bottleneck width padded to the tile: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(a))


def bucket(a: int) -> int:
    return 64 if block_a(a) <= 64 else 256


def gpu_config(kernel: str, bucket_: int, dtype, precision: str | None = None) -> dict:
    """The GPU configuration of `kernel` for a bottleneck bucket; D is the streamed dimension, so 4-byte
    inputs halve it as the LoRA kernels halve theirs, and fp32 with FMA dots ("ieee", `fma_dots`) takes the
    entry's "ieee" tiles."""
    cfg = dict(CONFIGS[kernel][bucket_])
    ieee = cfg.pop("ieee", None)
    cfg["BLOCK_D"] = tiles_for({"BLOCK_K": cfg["BLOCK_D"]}, dtype)["BLOCK_K"]
    if ieee is not None and fma_dots(dtype, precision):
        cfg.update(ieee)
    return cfg


def config_for(kernel: str, a: int, dtype) -> dict:
    if interpreting():
        return dict(INTERPRET_CONFIG)
    return gpu_config(kernel, bucket(a), dtype)


# --------------------------------------------------------------------------------------------------
# activations and their exact derivatives (fp32 in, fp32 out)

@triton.jit
def _tanh(u):
    # tanh without libdevice: 1 - 2/(e^{2u} + 1) saturates correctly at ±inf; absolute error ~1e-7
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        out = tl.maximum(z, 0.0)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * z * (1.0 + t)
    else:
        out = z / (1.0 + tl.exp(-z))
    return out


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)), sharing the transcendental between the two."""
    if ACT == 0:
        out = tl.maximum(z, 0.0)
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        out = z * cdf
        g = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * z * (1.0 + t)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        sig = 1.0 / (1.0 + tl.exp(-z))
        out = z * sig
        g = sig * (1.0 + z * (1.0 - sig))
    return out, g


# --------------------------------------------------------------------------------------------------
# forward

@triton.jit
def _rows_times_weight(P, W, rows_ld, offs_a, mask_a, D, stride_pm, stride_pd, stride_w_d, stride_w_a,
                       EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_A] = P[rows, :D]·W[:D, :A] (W addressed by its strides): the forward's
    down-projection x·Wdᵀ and the backward's dY·Wu, streamed over D in the activations' dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    p_ptrs = P + rows_ld[:, None] * stride_pm + offs_d[None, :] * stride_pd
    w_ptrs = W + offs_d[:, None] * stride_w_d + offs_a[None, :] * stride_w_a
    acc = tl.zeros((BLOCK_M, BLOCK_A), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            p = tl.load(p_ptrs)
            w = tl.load(w_ptrs, mask=mask_a[None, :], other=0.0)
        else:
            mask_d = offs_d < D - d0
            p = tl.load(p_ptrs, mask=mask_d[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_a[None, :] & mask_d[:, None], other=0.0)
        acc = tl.dot(p, w.to(P.dtype.element_ty), acc, input_precision=INPUT_PRECISION)
        p_ptrs += BLOCK_D * stride_pd
        w_ptrs += BLOCK_D * stride_w_d
    return acc


@triton.jit
def _adapter_kernel(
    X, R, Y, Z, WD, BD, WU, BU,
    M, D, A, scaling,
    stride_xm, stride_xd, stride_rm, stride_rd, stride_ym, stride_yd,
    stride_wd_a, stride_wd_d, stride_wu_d, stride_wu_a, stride_bd, stride_bu,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, STORE_Z: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # loads use wrapped row indices (no row masks in the loops); only the stores are masked
    rows_ld = (offs_m % M).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < A
    offs_d = tl.arange(0, BLOCK_D)
    cdtype = X.dtype.element_ty

    z = _rows_times_weight(X, WD, rows_ld, offs_a, mask_a, D, stride_xm, stride_xd, stride_wd_d, stride_wd_a,
                           EVEN_D, BLOCK_M, BLOCK_D, BLOCK_A, INPUT_PRECISION)
    if HAS_BD:
        z += tl.load(BD + offs_a * stride_bd, mask=mask_a, other=0.0).to(tl.float32)[None, :]
    rows = offs_m.to(tl.int64)
    if STORE_Z:
        tl.store(Z + rows[:, None] * A + offs_a[None, :], z, mask=mask_m[:, None] & mask_a[None, :])
    # padded bottleneck columns hold act(0) = 0 for every activation, and their Wu rows load as 0
    act = _act(z, ACT).to(cdtype)

    wu_ptrs = WU + offs_a[:, None] * stride_wu_a + offs_d[None, :] * stride_wu_d
    r_ptrs = R + rows_ld[:, None] * stride_rm + offs_d[None, :] * stride_rd
    y_ptrs = Y + rows[:, None] * stride_ym + offs_d[None, :] * stride_yd
    bu_ptrs = BU + offs_d * stride_bu
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            wu = tl.load(wu_ptrs, mask=mask_a[:, None], other=0.0)
            r = tl.load(r_ptrs)
            my = mask_m[:, None]
        else:
            mask_d = offs_d < D - d0
            wu = tl.load(wu_ptrs, mask=mask_a[:, None] & mask_d[None, :], other=0.0)
            r = tl.load(r_ptrs, mask=mask_d[None, :], other=0.0)
            my = mask_m[:, None] & mask_d[None, :]
        u = tl.dot(act, wu.to(cdtype), input_precision=INPUT_PRECISION)
        if HAS_BU:
            if EVEN_D:
                bu = tl.load(bu_ptrs)
            else:
                bu = tl.load(bu_ptrs, mask=mask_d, other=0.0)
            u += bu.to(tl.float32)[None, :]
        y = r.to(tl.float32) + scaling * u
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=my)
        wu_ptrs += BLOCK_D * stride_wu_d
        r_ptrs += BLOCK_D * stride_rd
        y_ptrs += BLOCK_D * stride_yd
        bu_ptrs += BLOCK_D * stride_bu


# --------------------------------------------------------------------------------------------------
# backward

@triton.jit
def _adapter_bwd_dz_kernel(
    DY, Z, WU, DZ, ACTZ, PBD,
    M, D, A, scaling,
    stride_dym, stride_dyd, stride_wu_d, stride_wu_a,
    ACT: tl.constexpr, NEED_DW: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows_ld = (offs_m % M).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < A

    da = _rows_times_weight(DY, WU, rows_ld, offs_a, mask_a, D, stride_dym, stride_dyd, stride_wu_d, stride_wu_a,
                            EVEN_D, BLOCK_M, BLOCK_D, BLOCK_A, INPUT_PRECISION)
    rows = offs_m.to(tl.int64)
    mz = mask_m[:, None] & mask_a[None, :]
    z = tl.load(Z + rows[:, None] * A + offs_a[None, :], mask=mz, other=0.0)
    act, grad = _act_and_grad(z, ACT)
    # rows past M hold wrapped duplicates: zero them so the bias-gradient partials stay exact
    dz = tl.where(mask_m[:, None], scaling * da * grad, 0.0)
    # dZ and act(Z) leave in the activations' dtype (the second kernel multiplies them in that dtype and
    # re-reads them once per D tile), in rows padded to BLOCK_A: aligned, unmasked columns, and the
    # padding holds zeros (Wu's padded rows load as 0, and act(0) = 0 for every activation)
    out_offs = rows[:, None] * BLOCK_A + offs_a[None, :]
    tl.store(DZ + out_offs, dz.to(DZ.dtype.element_ty), mask=mask_m[:, None])
    if NEED_DW:
        tl.store(ACTZ + out_offs, act.to(ACTZ.dtype.element_ty), mask=mask_m[:, None])
        tl.store(PBD + pid.to(tl.int64) * A + offs_a, tl.sum(dz, axis=0), mask=mask_a)


@triton.jit
def _adapter_bwd_kernel(
    DY, X, ACTZ, DZ, WD, DX, PWU, PWD, PBU,
    M, D, A, rows_per_split,
    stride_dym, stride_dyd, stride_xm, stride_xd, stride_dxm, stride_dxd, stride_wd_a, stride_wd_d,
    SKIP: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
    A_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_a = tl.arange(0, BLOCK_A)
    mask_a = offs_a < A

    offs_c = tl.arange(0, A_CHUNK)
    if NEED_DW:
        acc_wu = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)  # dWu transposed, see below
        acc_wd = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)
        acc_bu = tl.zeros((BLOCK_D,), dtype=tl.float32)

    m_start = pid_s * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)
        if EVEN_D:
            mt = mask_m[:, None]
        else:
            mt = mask_m[:, None] & mask_d[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + offs_d[None, :] * stride_dyd, mask=mt, other=0.0)
        if NEED_DX:
            # dX = dZ·Wd in bottleneck chunks: each warp holds the whole [A, BD] operand of a dot (see
            # CONFIGS), so chunks bound it; they re-read dZ and Wd, which stay in L1/L2
            dx = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for a0 in range(0, A, A_CHUNK):
                dzc = tl.load(DZ + rows[:, None] * BLOCK_A + (a0 + offs_c)[None, :], mask=mask_m[:, None], other=0.0)
                wd_mask = ((a0 + offs_c) < A)[:, None]
                if not EVEN_D:
                    wd_mask = wd_mask & mask_d[None, :]
                wdc = tl.load(WD + (a0 + offs_c)[:, None] * stride_wd_a + offs_d[None, :] * stride_wd_d,
                              mask=wd_mask, other=0.0)
                dx = tl.dot(dzc, wdc.to(DZ.dtype.element_ty), dx, input_precision=INPUT_PRECISION)
            if SKIP:
                dx += dy.to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dxm + offs_d[None, :] * stride_dxd, dx.to(DX.dtype.element_ty),
                     mask=mt)
        if NEED_DW:
            dz = tl.load(DZ + rows[:, None] * BLOCK_A + offs_a[None, :], mask=mask_m[:, None], other=0.0)
            act = tl.load(ACTZ + rows[:, None] * BLOCK_A + offs_a[None, :], mask=mask_m[:, None], other=0.0)
            # both weight products put the bottleneck on the dots' M side, so the operand each warp holds
            # whole (B, see CONFIGS) is a small [BM, BD] tile
            acc_wu = tl.dot(tl.trans(act), dy, acc_wu, input_precision=INPUT_PRECISION)
            x = tl.load(X + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd, mask=mt, other=0.0)
            acc_wd = tl.dot(tl.trans(dz), x, acc_wd, input_precision=INPUT_PRECISION)
            acc_bu += tl.sum(dy.to(tl.float32), axis=0)

    if NEED_DW:
        base = pid_s.to(tl.int64) * D * A
        tl.store(PWU + base + offs_d[None, :] * A + offs_a[:, None], acc_wu, mask=mask_a[:, None] & mask_d[None, :])
        tl.store(PWD + base + offs_a[:, None] * D + offs_d[None, :], acc_wd, mask=mask_a[:, None] & mask_d[None, :])
        tl.store(PBU + pid_s.to(tl.int64) * D + offs_d, acc_bu, mask=mask_d)


# --------------------------------------------------------------------------------------------------
# launchers: 2-D inputs [M, D] at any strides (stride 0 included), validated by the caller
# (fastpeft.ops.adapter); every tensor is addressed through its strides

def adapter_fwd(x, residual, down_w, down_b, up_w, up_b, scaling: float, act: str, store_z: bool, out=None):
    """y [M, D] in x's dtype (written into `out` when given), and Z = x·Wdᵀ + bd [M, A] fp32 when store_z
    (else None)."""
    import torch

    M, D = x.shape
    A = down_w.shape[0]
    r = x if residual is None else residual
    y = torch.empty((M, D), device=x.device, dtype=x.dtype) if out is None else out
    z = torch.empty((M, A), device=x.device, dtype=torch.float32) if store_z else y
    if M == 0:
        return y, (z if store_z else None)
    cfg = config_for("fwd", A, x.dtype)
    _adapter_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x, r, y, z, down_w, down_b if down_b is not None else down_w, up_w, up_b if up_b is not None else up_w,
        M, D, A, float(scaling),
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), y.stride(0), y.stride(1),
        down_w.stride(0), down_w.stride(1), up_w.stride(0), up_w.stride(1),
        down_b.stride(0) if down_b is not None else 0, up_b.stride(0) if up_b is not None else 0,
        ACT=ACT_ID[act], HAS_BD=down_b is not None, HAS_BU=up_b is not None, STORE_Z=store_z,
        EVEN_D=D % cfg["BLOCK_D"] == 0, BLOCK_A=block_a(A), INPUT_PRECISION=dot_precision(x.dtype),
        **tile_args(cfg), **launch_opts(cfg),
    )
    return y, (z if store_z else None)


def _num_splits(M: int, n_dtiles: int, block_m: int, device) -> int:
    """Splits of M for the weight-gradient reduction: enough programs to fill the device, a function of the
    shapes and the device only (so the summation order, hence the result, is reproducible)."""
    import torch

    if device.type != "cuda":
        return min(2, triton.cdiv(M, block_m))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(1, n_dtiles))
    return max(1, min(want, triton.cdiv(M, block_m)))


def adapter_bwd(dy, x, z, down_w, up_w, scaling: float, act: str, skip: bool, need_dx: bool, need_dw: bool):
    """Returns dx [M, D] (x's dtype, includes dy when skip) or None, and fp32 (dWd [A, D], dbd [A],
    dWu [D, A], dbu [D]) or Nones. Weight gradients are fp32; the caller casts them."""
    import torch

    M, D = x.shape
    A = down_w.shape[0]
    dev = x.device
    ip = dot_precision(x.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    dz = torch.empty((M, block_a(A)), device=dev, dtype=x.dtype)  # rows padded to the tile, see the kernel
    actz = torch.empty((M, block_a(A)), device=dev, dtype=x.dtype) if need_dw else dz
    cfg = config_for("dz", A, x.dtype)
    # row chunks of at most 1 + PARTIAL_BUDGET / (4·A) row blocks, so the dbd partials stay bounded
    chunk_blocks = min(triton.cdiv(M, cfg["BLOCK_M"]), 1 + _common.PARTIAL_BUDGET // (4 * max(A, 1)))
    pbd = torch.empty((max(chunk_blocks, 1), A), **f32) if need_dw else dz
    dbd = None
    for r0 in range(0, M, max(chunk_blocks, 1) * cfg["BLOCK_M"]):
        r1 = min(M, r0 + chunk_blocks * cfg["BLOCK_M"])
        blocks = triton.cdiv(r1 - r0, cfg["BLOCK_M"])
        # dz, actz and z are contiguous (the kernel addresses them by row), so row slices keep their layout
        _adapter_bwd_dz_kernel[(blocks,)](
            dy[r0:r1], z[r0:r1], up_w, dz[r0:r1], actz[r0:r1], pbd, r1 - r0, D, A, float(scaling),
            dy.stride(0), dy.stride(1), up_w.stride(0), up_w.stride(1),
            ACT=ACT_ID[act], NEED_DW=need_dw, EVEN_D=D % cfg["BLOCK_D"] == 0, BLOCK_A=block_a(A),
            INPUT_PRECISION=ip, **tile_args(cfg), **launch_opts(cfg),
        )
        if need_dw:  # chunk by chunk, in order: deterministic
            part = pbd[:blocks].sum(0)
            dbd = part if dbd is None else dbd.add_(part)
    cfg = config_for("bwd", A, x.dtype)
    n_dtiles = triton.cdiv(D, cfg["BLOCK_D"])
    splits = _num_splits(M, n_dtiles, cfg["BLOCK_M"], dev) if M > 0 else 0
    if need_dw:  # the weight-gradient partials: at most one output plus PARTIAL_BUDGET bytes
        splits = min(splits, 1 + _common.PARTIAL_BUDGET // (4 * (2 * D * A + D)))
    rows_per_split = triton.cdiv(triton.cdiv(M, max(splits, 1)), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    if M > 0:
        splits = triton.cdiv(M, rows_per_split)
    dx = torch.empty((M, D), device=dev, dtype=x.dtype) if need_dx else None
    if need_dw:
        pwu = torch.empty((splits, D, A), **f32)
        pwd = torch.empty((splits, A, D), **f32)
        pbu = torch.empty((splits, D), **f32)
    else:
        pwu = pwd = pbu = dz
    if M > 0 and (need_dx or need_dw):
        dxa = dx if need_dx else dy
        _adapter_bwd_kernel[(n_dtiles, splits)](
            dy, x, actz, dz, down_w, dxa, pwu, pwd, pbu,
            M, D, A, rows_per_split,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dxa.stride(0), dxa.stride(1),
            down_w.stride(0), down_w.stride(1),
            SKIP=skip, NEED_DX=need_dx, NEED_DW=need_dw, EVEN_D=D % cfg["BLOCK_D"] == 0,
            BLOCK_A=block_a(A), A_CHUNK=min(block_a(A), cfg["A_CHUNK"]), INPUT_PRECISION=ip,
            **tile_args(cfg), **launch_opts(cfg),
        )
    if not need_dw:
        return dx, None, None, None, None
    s = float(scaling)
    dwd = pwd.sum(0)
    if dbd is None:  # M == 0: an empty sum
        dbd = torch.zeros((A,), **f32)
    dwu = pwu.sum(0).mul_(s)
    dbu = pbu.sum(0).mul_(s)
    return dx, dwd, dbd, dwu, dbu
