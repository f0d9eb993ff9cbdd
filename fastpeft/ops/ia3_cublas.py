"""The "cublas" backend of IA3 on a frozen linear: cuBLAS for the GEMMs, fastpeft's Triton pass
(kernels/ia3.py `ia3_scale_reduce`: OUT = A ⊙ l and/or Σ_rows E ⊙ A, one read of A) for the rest. The
launchers have the signatures of every IA3 backend (fastpeft/ops/ia3.py `_impl`).

x [M, K], W [N, K] (N = out, K = in), l the IA3 vector, e the element size. The vector cannot ride in the
GEMM (cuBLAS scales by scalars only), so it costs one memory-bound pass, put on whichever side moves fewer
bytes: W (a scaled copy W', [N, K]: read W, write W', 2·N·K·e) or the activations (2·M·K·e or 2·M·N·e:
one read and one write of the [M, ·] operand or result it scales). Rule: the weight side when M > K for
output scaling (N·K < M·N) and when M > N for input scaling (N·K < M·K); else the activation side. Bytes
beyond the frozen linear's own GEMM:

  forward  output  y = (x·Wᵀ + b)⊙l   M > K: y = addmm(l⊙b, x, W'ᵀ), W' = diag(l)·W   2·N·K·e
                                      else:  y = addmm(b, x, Wᵀ); y ⊙= l in place      2·M·N·e
           input   y = (x⊙l)·Wᵀ + b   M > N: y = addmm(b, x, W'ᵀ), W' = W·diag(l)      2·N·K·e
                                      else:  y = addmm(b, x⊙l, Wᵀ)                     2·M·K·e
  backward output  dX = (dY⊙l)·W      M > K: dX = dY·W'                                2·N·K·e
                                      else:  dX = (dY⊙l)·W                             2·M·N·e
                   dl = Σ dY⊙(x·Wᵀ+b) Z = addmm(b, x, Wᵀ) again (2·M·N·K FLOPs, as the Triton backend), in
                                      row chunks; one pass reads Z and dY              3·M·N·e
           input   dX = (dY·W)⊙l      with dl: dX = dY·W, then one pass scales dX in place and reduces
                   dl = Σ x⊙(dY·W)    dl from it and x                                 3·M·K·e
                                      dX alone: M > N: dX = dY·W'                      2·N·K·e
                                                else:  dX = dY·W; dX ⊙= l in place     2·M·K·e
                                      dl alone: dY·W in row chunks, reduced with x     3·M·K·e
E.g. M = 8192, 4096 x 4096, bf16, output scaling: forward +64 MiB (W'; the epilogue pass would move 128 MiB)
beside the GEMM's 160 MiB; at M = 1 the pass over y moves 16 KiB.

Temporaries, at most one at a time: W' ([N, K], x's dtype), x⊙l or dY⊙l (only when M <= N, resp. M <= K: no larger
than W'), and the row chunks of Z or dY·W, each at most max([N, K], CHUNK_BYTES) (chunks of fewer rows
would re-read W once more each); plus the reduction's partials (kernels/common.py PARTIAL_BUDGET).
Rounding: W', x⊙l and dY⊙l are rounded to x's dtype before the GEMM (the Triton backend rounds x⊙l too, and
keeps l⊙(x·Wᵀ + b) in fp32 until the store), so 16-bit results differ from it by about one rounding.
Operands go to cuBLAS as they are (torch.mm copies one only when neither it nor its transpose has a unit
stride); the Triton pass takes every stride.
"""
from __future__ import annotations

import torch

from ..kernels.ia3 import ia3_scale_reduce

# A row chunk of the recomputed product (Z, or dY·W) per cuBLAS call: max(the weight's size, CHUNK_BYTES) bytes
# (16 MiB alone at N = 4096, 16-bit: 2048 rows, about two waves of 128x256 tiles on 132 SMs; 4096 x 4096: 4096).
CHUNK_BYTES = 16 << 20


def weight_side(M: int, other: int) -> bool:
    """Scale W (an [N, K] copy) rather than an [M, other] activation: fewer bytes (module docstring). `other`
    is K (in_features) for output scaling, N (out_features) for input scaling."""
    return M > other


def _scaled_weight(weight, scale, rows: bool):
    """W' = diag(l)·W (rows) or W·diag(l) (columns), row-major [N, K] in W's dtype, rounded once."""
    w2 = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    if rows:  # W's rows are the columns of Wᵀ
        ia3_scale_reduce(weight.t(), scale=scale, out=w2.t())
    else:
        ia3_scale_reduce(weight, scale=scale, out=w2)
    return w2


def _scaled(a, scale):
    """a ⊙ scale (columns) as a new row-major tensor of a's dtype."""
    out = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    ia3_scale_reduce(a, scale=scale, out=out)
    return out


def _linear(x, w_t, bias, out):
    """out = x·w_t + bias by cuBLAS, the bias its C input (read once in the epilogue)."""
    if bias is None:
        return torch.mm(x, w_t, out=out)
    return torch.addmm(bias, x, w_t, out=out)


def _chunk_rows(M: int, n: int, weight, itemsize: int) -> int:
    """Rows of an [M, n] product per cuBLAS call: at most max(W's size, CHUNK_BYTES) bytes."""
    elems = max(weight.numel(), CHUNK_BYTES // itemsize)
    return max(1, min(M, elems // max(n, 1)))


def _product_reduce(a, b_t, bias, e, weight):
    """Σ_rows e ⊙ (a·b_t + bias) in fp32 [N]: the product by cuBLAS in row chunks (`_chunk_rows`) into one
    reused buffer, each reduced with e's rows by the Triton pass and summed in chunk order (deterministic)."""
    M, N = a.shape[0], b_t.shape[1]
    rows = _chunk_rows(M, N, weight, a.element_size())
    buf = torch.empty((rows, N), device=a.device, dtype=a.dtype)
    total = None
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        z = _linear(a[r0:r1], b_t, bias, buf[:r1 - r0])
        part = ia3_scale_reduce(z, e=e[r0:r1])
        total = part if total is None else total.add_(part)
    return total


def ia3_fwd_cublas(x, weight, bias, scale, mode: str, out=None):
    """y [M, N] in x's dtype (written into `out` when given)."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    if M == 0:
        return y
    if mode == "output":
        if weight_side(M, K):
            b2 = None if bias is None else (bias.float() * scale.float()).to(x.dtype)  # [N]: l⊙b
            return _linear(x, _scaled_weight(weight, scale, rows=True).t(), b2, y)
        _linear(x, weight.t(), bias, y)
        ia3_scale_reduce(y, scale=scale, out=y)  # in place: one read and one write of y
        return y
    if weight_side(M, N):
        return _linear(x, _scaled_weight(weight, scale, rows=False).t(), bias, y)
    return _linear(_scaled(x, scale), weight.t(), bias, y)  # x ⊙ l rounded to x's dtype, as PEFT does


def ia3_bwd_cublas(dy, x, weight, bias, scale, mode: str, need_dx: bool, need_dl: bool):
    """dx [M, K] (x's dtype) or None, and dl (fp32, shape of scale) or None."""
    M, K = x.shape
    N = weight.shape[0]
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else None
    if M == 0:
        return dx, (torch.zeros(scale.shape, device=x.device, dtype=torch.float32) if need_dl else None)
    dl = None
    if mode == "output":
        if need_dx:
            if weight_side(M, K):
                torch.mm(dy, _scaled_weight(weight, scale, rows=True), out=dx)
            else:
                torch.mm(_scaled(dy, scale), weight, out=dx)
        if need_dl:  # the pre-scale product recomputed, never y / l (see kernels/ia3.py)
            dl = _product_reduce(x, weight.t(), bias, dy, weight)
        return dx, dl
    if need_dx and (need_dl or not weight_side(M, N)):
        torch.mm(dy, weight, out=dx)  # dY·W, scaled in place below (and reduced with x for dl)
        dl = ia3_scale_reduce(dx, scale=scale, out=dx, e=x if need_dl else None)
    elif need_dx:
        torch.mm(dy, _scaled_weight(weight, scale, rows=False), out=dx)
    elif need_dl:
        dl = _product_reduce(dy, weight, None, x, weight)
    return dx, dl


__all__ = ["ia3_fwd_cublas", "ia3_bwd_cublas", "weight_side", "CHUNK_BYTES"]
