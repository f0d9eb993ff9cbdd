"""Triton kernels of GaLore: the projection with Adam in its epilogue, and the in-place rank-r weight update.

_galore_project_kernel: C = A·B for a skinny result ([r, n] or [m, r]) with a long reduction (m, n or the
token count), fp32 accumulation, and one of three epilogues:
  EPI_STORE:  C = A·B                                   (fp32 out)
  EPI_ACC:    C += A·B                                  (fp32 accumulator: gradient accumulation of R)
  EPI_ADAM:   R = A·B; m = b1·m + (1-b1)·R; v = b2·v + (1-b2)·R²; C = m / (sqrt(v) + eps)
so the projected gradient R never goes to memory in the optimizer step.
_galore_update_kernel: W = (W - alpha·A·B)·decay in place, A·B the rank-r back-projection (P·N or N·Q);
each W tile is read and written once and no m×n temporary exists.
_galore_adam_kernel: the Adam epilogue alone, for an R accumulated by the gradient-free backward.

A and B may be any strided views (Pᵀ is P with swapped strides). Tiles are cast to DOT_DTYPE before tl.dot
(the 16-bit dtype of the matrices, or fp32 when either is fp32), accumulation is fp32.

Argument legend: a_ptr [M, K], b_ptr [K, N] the product's operands; c_ptr the [M, N] fp32 result (or the
normalised Adam update); m_ptr / v_ptr Adam's first and second moments; w_ptr the weight updated in place;
r_ptr / n_ptr the Adam kernel's input and output. stride_<t><d> is tensor t's stride along dimension d.
"""
import torch
import triton
import triton.language as tl

from .common import dot_precision, interpreting

EPI_STORE, EPI_ACC, EPI_ADAM = 0, 1, 2

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): every configuration a GPU launch can choose, keyed by
# the tl.dot operand class ("16bit" tensor cores, "fp32" ieee or tf32). Larger tiles (128×128) spill with
# pointer-tensor loads and the Adam epilogue (checked with tests/static_compile.py), so they are not offered.
PROJECT_CONFIGS = {"16bit": (64, 64, 64, 4, 3), "fp32": (32, 32, 32, 4, 2)}
UPDATE_CONFIGS = {"16bit": (64, 64, 32, 4, 3), "fp32": (64, 64, 32, 4, 3)}
ADAM_CONFIGS = {"fp32": (1024, 4)}
INTERPRET_PROJECT = (16, 16, 16, 1, 1)
INTERPRET_UPDATE = (16, 32, 16, 1, 1)
INTERPRET_ADAM = (128, 1)

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _tile_matmul(a_ptr, b_ptr, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n, mask_m, mask_n,
                 DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile (pid_m, pid_n) of A·B, the main loop both GaLore GEMMs share."""
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit scalar tile bases, 32-bit in-tile offsets: int64 pointer tensors cost registers (and spill),
    # while the scalar bases carry the part of the address that can exceed 2**31 (row · K of a long input)
    a_base = a_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am
    b_base = b_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_bn
    a_offs = tl.arange(0, BLOCK_M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_offs = offs_k[:, None] * stride_bk + tl.arange(0, BLOCK_N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_base + a_offs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_base + b_offs, mask=mask_n[None, :], other=0.0)
        else:
            kk = k0 + offs_k
            a = tl.load(a_base + a_offs, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(b_base + b_offs, mask=(kk[:, None] < K) & mask_n[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        a_base += BLOCK_K * stride_ak
        b_base += BLOCK_K * stride_bk
    return acc


@triton.jit
def _galore_project_kernel(a_ptr, b_ptr, c_ptr, m_ptr, v_ptr, M, N, K,
                           stride_am, stride_ak, stride_bk, stride_bn,
                           beta1, beta2, eps,
                           EPILOGUE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                           EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _tile_matmul(a_ptr, b_ptr, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n, mask_m, mask_n,
                       DOT_DTYPE, INPUT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    # C, m and v are contiguous [M, N] fp32 (the optimizer allocates them), small enough for int32 offsets
    offs_c = offs_m[:, None] * N + offs_n[None, :]
    mask_c = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 0:
        tl.store(c_ptr + offs_c, acc, mask=mask_c)
    elif EPILOGUE == 1:
        prev = tl.load(c_ptr + offs_c, mask=mask_c, other=0.0)
        tl.store(c_ptr + offs_c, prev + acc, mask=mask_c)
    else:
        mom = tl.load(m_ptr + offs_c, mask=mask_c, other=0.0)
        var = tl.load(v_ptr + offs_c, mask=mask_c, other=0.0)
        mom = beta1 * mom + (1.0 - beta1) * acc
        var = beta2 * var + (1.0 - beta2) * acc * acc
        tl.store(m_ptr + offs_c, mom, mask=mask_c)
        tl.store(v_ptr + offs_c, var, mask=mask_c)
        tl.store(c_ptr + offs_c, mom / (tl.sqrt(var) + eps), mask=mask_c)


@triton.jit
def _galore_update_kernel(w_ptr, a_ptr, b_ptr, M, N, K,
                          stride_wm, stride_wn, stride_am, stride_ak, stride_bk, stride_bn,
                          alpha, decay,
                          DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _tile_matmul(a_ptr, b_ptr, K, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n, mask_m, mask_n,
                       DOT_DTYPE, INPUT_PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    w_ptrs = w_ptr + offs_m[:, None].to(tl.int64) * stride_wm + offs_n[None, :].to(tl.int64) * stride_wn
    mask_w = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptrs, mask=mask_w, other=0.0).to(tl.float32)
    w = (w - alpha * acc) * decay
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=mask_w)


@triton.jit
def _galore_adam_kernel(r_ptr, m_ptr, v_ptr, n_ptr, numel, beta1, beta2, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    mom = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + (1.0 - beta1) * r
    var = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * r * r
    tl.store(m_ptr + offs, mom, mask=mask)
    tl.store(v_ptr + offs, var, mask=mask)
    tl.store(n_ptr + offs, mom / (tl.sqrt(var) + eps), mask=mask)


def dot_dtype(*dtypes):
    """The tl.dot operand dtype for matrices of these dtypes: fp32 if any is fp32, else the 16-bit one."""
    if torch.float32 in dtypes:
        return torch.float32
    return next(d for d in dtypes if d in (torch.float16, torch.bfloat16))


def _dtype_class(dot: torch.dtype) -> str:
    return "fp32" if dot == torch.float32 else "16bit"


def pick_project_config(dot: torch.dtype):
    return INTERPRET_PROJECT if interpreting() else PROJECT_CONFIGS[_dtype_class(dot)]


def pick_update_config(dot: torch.dtype):
    return INTERPRET_UPDATE if interpreting() else UPDATE_CONFIGS[_dtype_class(dot)]


def galore_project(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, epilogue: int = EPI_STORE,
                   exp_avg: torch.Tensor | None = None, exp_avg_sq: torch.Tensor | None = None,
                   beta1: float = 0.0, beta2: float = 0.0, eps: float = 0.0) -> torch.Tensor:
    """out (contiguous fp32 [M, N]) = / += / Adam-epilogue of a·b, a [M, K] and b [K, N] any strides."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    if K == 0:
        # an empty reduction: A·B = 0
        if epilogue == EPI_STORE:
            out.zero_()
            return out
        if epilogue == EPI_ACC:
            return out
    dot = dot_dtype(a.dtype, b.dtype)
    bm, bn, bk, warps, stages = pick_project_config(dot)
    if exp_avg is None:
        exp_avg = exp_avg_sq = out  # unused by the non-Adam epilogues
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _galore_project_kernel[grid](
        a, b, out, exp_avg, exp_avg_sq, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(beta1), float(beta2), float(eps),
        EPILOGUE=epilogue, DOT_DTYPE=_TL[dot], INPUT_PRECISION=dot_precision(dot),
        EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def galore_update(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, decay: float) -> torch.Tensor:
    """w = (w - alpha·a·b)·decay in place; a [M, K], b [K, N], any strides."""
    M, N = w.shape
    K = a.shape[1]
    if M == 0 or N == 0:
        return w
    # 16-bit weights: the fp32 N is rounded to the weight's dtype for the tensor cores (2**-9 relative on an
    # update that is itself rounded into a 16-bit W); fp32 weights keep an fp32 product
    dot = w.dtype if w.dtype != torch.float32 else dot_dtype(a.dtype, b.dtype)
    bm, bn, bk, warps, stages = pick_update_config(dot)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _galore_update_kernel[grid](
        w, a, b, M, N, K, w.stride(0), w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(alpha), float(decay),
        DOT_DTYPE=_TL[dot],
        INPUT_PRECISION=dot_precision(dot), EVEN_K=K % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return w


def galore_adam(r: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, out: torch.Tensor,
                beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """Adam moments of r (all contiguous fp32) updated in place; out = m / (sqrt(v) + eps)."""
    numel = r.numel()
    if numel == 0:
        return out
    block, warps = INTERPRET_ADAM if interpreting() else ADAM_CONFIGS["fp32"]
    _galore_adam_kernel[(triton.cdiv(numel, block),)](r, exp_avg, exp_avg_sq, out, numel, float(beta1), float(beta2),
                                                      float(eps), BLOCK=block, num_warps=warps)
    return out
