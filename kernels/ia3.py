"""IA3 on a frozen linear: the learned vector l folded into the linear's GEMM.

output scaling (k, v projections):  y = (x·Wᵀ + b) ⊙ l    l in the GEMM epilogue
input scaling (feed-forward):       y = (x ⊙ l)·Wᵀ + b    l in the GEMM prologue (x ⊙ l rounded to x's
                                                           dtype, as PEFT computes it)
One GEMM kernel serves every product (`_ia3_kernel`):
    C = ((A ⊙ pro[k])·B + bias[n]) ⊙ epi[n],  optionally P[pid_m, n] = Σ_rows E ⊙ (A·B + bias)
forward: A = x, B = Wᵀ. backward: A = dY, B = W, so dX = (dY ⊙ l)·W (output scaling, prologue) or
dX = (dY·W) ⊙ l (input scaling, epilogue); for input scaling the epilogue also reduces
dl = Σ_m x ⊙ (dY·W) from the tile it already holds: per-row-block partials, summed in a fixed order.
For output scaling dl = Σ_m dY ⊙ (x·Wᵀ + b) needs the pre-scale product: the backward recomputes it
(A = x, B = Wᵀ, the bias, E = dY, no C) rather than saving it (an [M, N] tensor per layer) or recovering
it as y / l (wrong for tiny l, NaN for subnormal l, and it would forbid in-place edits of y): one more
GEMM of x and W, only when l needs a gradient.
Matrices and the bias and prologue scale are addressed through their strides (any layout, stride 0
included). The epilogue scale alone is read at unit stride: the launcher copies a strided or expanded one
(N elements, next to an M·N·K GEMM), because its runtime stride costs the 128x128 pointer tile on sm_90
the registers it has not got (8 bytes of spills, tests/test_ia3.py's static cases).

Kernel argument legend: A [M, K] and B [K, N] the GEMM operands (B_KN: B stored [K, N], else read from
Bᵀ [N, K]); C [M, N] the output; BIAS [N]; PRO [K] the prologue scale of A's columns; EPI [N] the epilogue
scale; E [M, N] the reduction's weights and P [row blocks, N] its fp32 per-row-block partials.

Bounded temporaries: the reduction's partials are one row per row block of the GEMM's output tiles, so the
launcher runs the GEMM over row chunks of at most 1 + PARTIAL_BUDGET / (4·N) row blocks (kernels/common.py),
reusing one partial buffer, and sums each chunk's partials into dl in chunk order: at most one [N] output plus
PARTIAL_BUDGET (4 MiB) bytes whatever M, and a fixed summation order (deterministic, no float atomics).
At M = 8192 ("large_fused", BLOCK_M = 128) the partial is [64, N]: 1 MiB at N = 4096, 2.75 MiB at N = 11008,
one chunk as before; it grew with M (M = 65536: 8 and 22 MiB), now at most [257, 4096] and [96, 11008].

Two paths, as for the LoRA GEMM (kernels/lora_linear.py): "tma" (Hopper or newer, 16-byte aligned rows)
moves A, B, C and E through tensor descriptors, which need no address registers; "ptr" uses pointer
tensors, which cost registers, so its tiles are smaller.

The "cublas" backend (fastpeft/ops/ia3_cublas.py) runs the GEMMs in cuBLAS and everything else in one
memory-bound kernel, `_ia3_scale_reduce_kernel`, on an [M, N] matrix A at any strides:
    OUT = A ⊙ scale[n]   (OUT may be A itself)   and/or   P[split, n] = Σ_rows E ⊙ A   (fp32 partials)
one read of A (and E), one write of OUT; the reduction on a fixed number of programs along M
(kernels/common.py reduction_programs: at most one [N] output plus PARTIAL_BUDGET bytes), summed in a fixed
order. Scaling W's rows is the same pass on Wᵀ (a transposed view).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import autotune
from . import common as _common  # PARTIAL_BUDGET, read at each launch (tests lower it)
from .common import (
    dot_precision, grouped_tile, interpreting, launch_opts, path_for, reduction_programs, split_even, tile_args,
    tiles_for,
)
from . import gemm_tuning as _tuning  # tunable: tests replace it there
from .gemm_loop import gemm_k_loop
from .gemm_tuning import DEFAULT_CANDIDATE  # noqa: F401 (re-exported: the static test reads it)

# ----------------------------------------------------------------------------------------------- configs
# Every configuration a launcher can pick; tests/test_ia3.py compiles each ("tma" for sm_90, "ptr" for
# sm_80 and sm_90) and requires no spills and tensor cores. fp32 inputs halve BLOCK_K, and fp32 with "ieee"
# dots (FMA, no tensor cores) takes the smallest reduction tile (`tiles_for`).
# "large_fused": the variants that hold a second [BM, *] tile in registers beside the accumulator (the
# prologue's scaled A operand, the reduction's E tile) take a narrower tile than the plain epilogue.
# The static defaults; GEMM_CANDIDATES below are what the launcher times on a GPU (no GPU has measured them yet).
GEMM_CONFIGS = {
    "tma": {
        "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
        "mid": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        "large": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        "large_fused": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    },
    "ptr": {
        "decode": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
        "mid": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        "large": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        "large_fused": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    },
}
# What the launcher times per size on a GPU (kernels/gemm_tuning.py; FASTPEFT_AUTOTUNE=0: "default", the entry
# above, the static default). 16-bit operands only: fp32 keeps "default", so tests/test_ia3.py compiles the
# other candidates for bf16 alone. Why these (no GPU has measured them yet; 132 SMs on H100/H200):
#   decode: W streams once; 64-column tiles give N/64 programs (64 at N = 4096), 32 columns twice as many, a
#     longer K tile keeps the bytes in flight.
#   mid: M <= 256 is at most 4 row tiles, so the column tiles set the parallelism: 128 columns give 128
#     programs at M = 256, N = 4096 (under one wave), 64 columns 256, with one more stage to hide the latency.
#   large: 128x256 tiles at M = 8192, N = 4096 are 1024 programs, 7.76 waves: 128x128 (4 stages, the fused
#     variants' tile) evens out shapes whose last wave is ragged.
#   large_fused: 128x128 holds a second tile (prologue's scaled A, the reduction's E) beside the accumulator;
#     64x128 at 4 warps halves both per program and doubles the programs.
#   "ptr" (pointer tensors' registers): a K-32, 4-stage variant of each large tile (the classic Ampere shape).
GEMM_CANDIDATES = {
    "tma": {
        "decode": {"default": GEMM_CONFIGS["tma"]["decode"],
                   "n32": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)},
        "mid": {"default": GEMM_CONFIGS["tma"]["mid"],
                "n64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5)},
        "large": {"default": GEMM_CONFIGS["tma"]["large"],
                  "128x128": GEMM_CONFIGS["tma"]["large_fused"]},
        "large_fused": {"default": GEMM_CONFIGS["tma"]["large_fused"],
                        "64x128": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)},
    },
    "ptr": {
        "decode": {"default": GEMM_CONFIGS["ptr"]["decode"]},
        "mid": {"default": GEMM_CONFIGS["ptr"]["mid"]},
        "large": {"default": GEMM_CONFIGS["ptr"]["large"],
                  "k32s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4)},
        "large_fused": {"default": GEMM_CONFIGS["ptr"]["large_fused"],
                        "k32s4": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4)},
    },
}
OP = "ia3_gemm"  # its decisions in backend_report()["autotune"]
# Under the interpreter: small tiles, so the tests' small shapes span several tiles and tails.
INTERPRET_GEMM_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1)


def gemm_config_name(M: int, fused: bool) -> str:
    """fused: the variant scales A in the prologue or reduces E ⊙ (A·B) in the epilogue."""
    if M <= 32:
        return "decode"
    if M <= 256:
        return "mid"
    return "large_fused" if fused else "large"


def gemm_config(M: int, dtype, path: str, fused: bool) -> dict:
    if interpreting():
        return dict(INTERPRET_GEMM_CONFIG)
    return tiles_for(GEMM_CONFIGS[path][gemm_config_name(M, fused)], dtype)


@functools.lru_cache(maxsize=None)
def _resolved_candidates(path: str, size: str, dtype, precision: str) -> dict:
    return _tuning.resolve_candidates(GEMM_CANDIDATES[path][size], dtype, precision)


def gemm_candidates(M: int, dtype, path: str, fused: bool) -> dict:
    """{name: resolved config} the launcher may time (GEMM_CANDIDATES; fp32: "default" alone), the static
    default under DEFAULT_CANDIDATE. Cached and shared: callers must not modify the configs."""
    return _resolved_candidates(path, gemm_config_name(M, fused), dtype, dot_precision(dtype))


def _key(a, w, N, K, path, flags) -> tuple:
    """The tuning key: dtype, path, rows bucketed, N, K and the variant (its kernel's constexpr flags)."""
    return (a.dtype, path, f"m{autotune.m_bucket(a.shape[0])}", f"n{N}", f"k{K}",
            "+".join(name for name, on in flags.items() if on) or "plain")


def _describe(key: tuple, choice: str) -> dict:
    """The chosen config's tiles, for backend_report()["autotune"] (autotune.set_describer)."""
    dtype, path, mb, _, _, variant = key[:6]
    fused = "pro" in variant.split("+") or "red" in variant.split("+")
    return dict(gemm_candidates(int(mb[1:]), dtype, path, fused).get(choice, {}))


autotune.set_describer(OP, _describe)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _ia3_kernel(
    A, B, C, BIAS, PRO, EPI, E, P,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_em, stride_en,
    stride_bias, stride_pro,
    HAS_BIAS: tl.constexpr, HAS_PRO: tl.constexpr, HAS_EPI: tl.constexpr, HAS_RED: tl.constexpr,
    STORE_C: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, B_KN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:  # the bias starts the accumulator, so the epilogue holds one [BN] vector, not two
        acc += tl.load(BIAS + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # B_KN: B is stored [K, N] with unit stride along N (backward's W); else as Bᵀ [N, K] (forward's W).
    # Pointer loads use wrapped (not masked) rows and columns, so the K loop carries no M/N masks.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    acc = gemm_k_loop(acc, A, B, PRO, rows, cols, M, N, K, pid_m * BLOCK_M, pid_n * BLOCK_N,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_pro,
                      P_DESC=USE_TMA, Q_DESC=USE_TMA, Q_KN=B_KN, HAS_PRO=HAS_PRO, EVEN_K=EVEN_K,
                      DOT_PRECISION=INPUT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)

    if HAS_RED:  # before the epilogue scales acc: the raw product, plus the bias it started from
        if USE_TMA:  # rows and columns past the edges load as 0
            e_desc = tl.make_tensor_descriptor(E, shape=[M, N], strides=[stride_em, 1], block_shape=[BLOCK_M, BLOCK_N])
            e = e_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N])
        else:
            e = tl.load(E + offs_m[:, None].to(tl.int64) * stride_em + offs_n[None, :] * stride_en,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        part = tl.sum(e.to(tl.float32) * acc, axis=0)
        tl.store(P + pid_m.to(tl.int64) * N + offs_n, part, mask=mask_n)
    if STORE_C:
        if HAS_EPI:
            acc *= tl.load(EPI + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if USE_TMA:
            c_desc = tl.make_tensor_descriptor(C, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(C.dtype.element_ty))
        else:
            tl.store(C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
                     acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------
# launchers: 2-D x [M, K], weight [N, K] at any strides (stride 0 included), validated by the caller
# (fastpeft.ops.ia3)


def _unit_stride(v):
    """The vector itself when its stride is 1, else a contiguous copy of its N elements (see the module
    docstring: the epilogue scale's runtime stride would spill)."""
    return v if v is None or v.stride(0) == 1 or v.numel() <= 1 else v.contiguous()


def _gemm(a, w, *, b_kn, N, K, c=None, bias=None, pro=None, epi=None, e=None, tuned=None):
    """c = ((a ⊙ pro)·B + bias) ⊙ epi for a [M, K], where B = wᵀ (b_kn False: w is [N, K]) or B = w
    (b_kn True: w is [K, N]). With e [M, N]: returns Σ_rows e ⊙ (a·B + bias), fp32 [N], from per-row-block
    partials in row chunks of a bounded partial buffer (module docstring). The config: measured on CUDA tensors
    (kernels/gemm_tuning.py), else the interpreter's; tuned = (path, config) forces both (the timing runs)."""
    epi = _unit_stride(epi)
    M = a.shape[0]
    fused = pro is not None or e is not None
    if tuned is not None:
        path, cfg = tuned
    else:
        # path_for sends expanded (stride-0) or overlapping rows through pointers
        path = path_for(a.device, *(t for t in (a, w, c, e) if t is not None))
        if _tuning.tunable(a.device):
            flags = {"bias": bias is not None, "pro": pro is not None, "epi": epi is not None, "red": e is not None,
                     "c": c is not None, "b_kn": b_kn}
            cfg = _tuning.tuned_config(
                OP, _key(a, w, N, K, path, flags), a.device, gemm_candidates(M, a.dtype, path, fused),
                lambda g: tuple(_tuning.fresh_like(t, g) for t in (a, w, c, bias, pro, epi, e)),
                lambda t, cfg: _gemm(t[0], t[1], b_kn=b_kn, N=N, K=K, c=t[2], bias=t[3], pro=t[4], epi=t[5],
                                     e=t[6], tuned=(path, cfg)))
        else:
            cfg = gemm_config(M, a.dtype, path, fused)
    stride_bk, stride_bn = (w.stride(0), w.stride(1)) if b_kn else (w.stride(1), w.stride(0))
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    chunk_blocks = m_blocks
    p = total = None
    if e is not None:  # row chunks whose partials fit the budget (chunks start on tile rows: TMA stays aligned)
        chunk_blocks = min(m_blocks, 1 + _common.PARTIAL_BUDGET // (4 * max(N, 1)))
        p = torch.empty((chunk_blocks, N), device=a.device, dtype=torch.float32)
    dummy = a
    for r0 in range(0, M, chunk_blocks * cfg["BLOCK_M"]):
        r1 = min(M, r0 + chunk_blocks * cfg["BLOCK_M"])
        ac = a[r0:r1]
        cc = c[r0:r1] if c is not None else dummy
        ee = e[r0:r1] if e is not None else dummy
        mc = r1 - r0
        blocks = triton.cdiv(mc, cfg["BLOCK_M"])
        grid = (blocks * triton.cdiv(N, cfg["BLOCK_N"]),)
        _ia3_kernel[grid](
            ac, w, cc, bias if bias is not None else dummy, pro if pro is not None else dummy,
            epi if epi is not None else dummy, ee, p if p is not None else dummy,
            mc, N, K,
            ac.stride(0), ac.stride(1), stride_bk, stride_bn, cc.stride(0), cc.stride(1), ee.stride(0), ee.stride(1),
            bias.stride(0) if bias is not None else 0, pro.stride(0) if pro is not None else 0,
            HAS_BIAS=bias is not None, HAS_PRO=pro is not None, HAS_EPI=epi is not None, HAS_RED=e is not None,
            STORE_C=c is not None, EVEN_K=K % cfg["BLOCK_K"] == 0, USE_TMA=path == "tma", B_KN=b_kn,
            INPUT_PRECISION=dot_precision(a.dtype), **tile_args(cfg), **launch_opts(cfg),
        )
        if p is not None:  # chunk by chunk, in order: deterministic
            part = p[:blocks].sum(0)
            total = part if total is None else total.add_(part)
    return total


def ia3_fwd(x, weight, bias, scale, mode: str, out=None):
    """y [M, N] in x's dtype (written into `out` when given): (x·Wᵀ + b) ⊙ l for mode "output",
    (x ⊙ l)·Wᵀ + b for mode "input"."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    if M == 0:
        return y
    _gemm(x, weight, b_kn=False, N=N, K=K, c=y, bias=bias,
          pro=scale if mode == "input" else None, epi=scale if mode == "output" else None)
    return y


def ia3_bwd(dy, x, weight, bias, scale, mode: str, need_dx: bool, need_dl: bool):
    """dx [M, K] (x's dtype) or None, and dl (fp32, shape of scale) or None."""
    M, K = x.shape
    N = weight.shape[0]
    dev = x.device
    dx = torch.empty((M, K), device=dev, dtype=x.dtype) if need_dx else None
    if M == 0:
        return dx, (torch.zeros(scale.shape, device=dev, dtype=torch.float32) if need_dl else None)
    dl = None
    if mode == "output":
        if need_dx:
            _gemm(dy, weight, b_kn=True, N=K, K=N, c=dx, pro=scale)
        if need_dl:  # Σ_m dY ⊙ (x·Wᵀ + b), the pre-scale product recomputed (see the module docstring)
            dl = _gemm(x, weight, b_kn=False, N=N, K=K, bias=bias, e=dy)
    else:
        dl = _gemm(dy, weight, b_kn=True, N=K, K=N, c=dx, epi=scale, e=x if need_dl else None)
    return dx, dl


# ------------------------------------------------------------------------ the cuBLAS backend's elementwise pass
# One config for every dtype: [16, 128] tiles of A (and E) and the fp32 accumulator of the reduction in
# registers at 4 warps (at most ~110 registers a thread, runtime strides; [32, 128] took up to 214).
# tests/test_ia3_cublas.py compiles every variant for sm_80 and sm_90 (no spills). Untuned: a GPU run is owed.
SCALE_REDUCE_CONFIG = dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=1)
INTERPRET_SCALE_REDUCE_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)


def scale_reduce_config() -> dict:
    return dict(INTERPRET_SCALE_REDUCE_CONFIG if interpreting() else SCALE_REDUCE_CONFIG)


@triton.jit
def _ia3_scale_reduce_kernel(
    A, E, SCALE, OUT, P, M, N, rows_per,
    stride_am, stride_an, stride_em, stride_en, stride_om, stride_on, stride_scale,
    HAS_SCALE: tl.constexpr, HAS_RED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (pid_n, pid_s): columns pid_n·BLOCK_N.., rows [pid_s·rows_per, (pid_s + 1)·rows_per) in BLOCK_M
    steps. OUT = A ⊙ SCALE (HAS_SCALE; A read before OUT is written, so OUT may alias A) and the program's
    partial P[pid_s, n] = Σ E ⊙ A of the unscaled A (HAS_RED)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_SCALE:
        scale = tl.load(SCALE + offs_n * stride_scale, mask=mask_n, other=0.0).to(tl.float32)
    # the column tile's offset as 64-bit scalars (N·stride may pass 2**31: a transposed weight), in-tile in 32 bits
    n0 = (pid_n * BLOCK_N).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)[None, :]
    A += n0 * stride_an
    E += n0 * stride_en
    OUT += n0 * stride_on
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid_s * rows_per
    end = tl.minimum(start + rows_per, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < end)[:, None] & mask_n[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        a = tl.load(A + rows * stride_am + cols * stride_an, mask=mask, other=0.0).to(tl.float32)
        if HAS_RED:
            e = tl.load(E + rows * stride_em + cols * stride_en, mask=mask, other=0.0).to(tl.float32)
            acc += e * a
        if HAS_SCALE:
            tl.store(OUT + rows * stride_om + cols * stride_on, (a * scale[None, :]).to(OUT.dtype.element_ty),
                     mask=mask)
    if HAS_RED:
        tl.store(P + pid_s.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=mask_n)


def ia3_scale_reduce(a, scale=None, out=None, e=None):
    """out = a ⊙ scale (scale [N] scales a's columns; out [M, N] may be a itself) and, with e [M, N], returns
    Σ_rows e ⊙ a (of a before scaling) in fp32 [N], else None. Every tensor at any strides (stride 0
    included, out excepted: it is written)."""
    M, N = a.shape
    if M == 0 or N == 0:
        return torch.zeros(N, device=a.device, dtype=torch.float32) if e is not None else None
    cfg = scale_reduce_config()
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    if e is None:  # elementwise: one row block per program (several past the grid's 65535 limit along y)
        per, splits = split_even(m_blocks, 65535)
    else:  # a fixed number of programs along M, each writing one partial (bounded, deterministic)
        per, splits = split_even(m_blocks, reduction_programs(a.device, m_blocks, n_blocks, 4 * N))
    p = torch.empty((splits, N), device=a.device, dtype=torch.float32) if e is not None else None
    dummy = a
    ee, oo = (e if e is not None else dummy), (out if out is not None else dummy)
    _ia3_scale_reduce_kernel[(n_blocks, splits)](
        a, ee, scale if scale is not None else dummy, oo, p if p is not None else dummy, M, N, per * cfg["BLOCK_M"],
        a.stride(0), a.stride(1), ee.stride(0), ee.stride(1), oo.stride(0), oo.stride(1),
        scale.stride(0) if scale is not None else 0,
        HAS_SCALE=scale is not None, HAS_RED=e is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        **launch_opts(cfg),
    )
    if p is None:
        return None
    return p[0] if splits == 1 else p.sum(0)
