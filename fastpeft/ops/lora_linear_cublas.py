"""The "cublas" backend of the LoRA linear: cuBLAS for the two big GEMMs, fastpeft's Triton kernels for the
rest. The launchers have the (fwd, bwd) signatures of every LoRA backend (fastpeft/ops/lora_linear.py `_impl`).

Forward on x [M, K]:   S = dropout(x)·Aᵀ                 Triton shrink (kernels/lora_linear.py), one read of x
                       C = s·S·Bᵀ + bias   [M, N]         Triton skinny kernel (kernels/lora_skinny.py), y's dtype
                       y = C + x·W0ᵀ                      cuBLAS: C.addmm_(x, W0ᵀ), C read once in the epilogue
                                                          (beta=1) and overwritten by y in place
Backward:              dS = s·dY·B, dB, dbias             Triton dY kernel, one read of dY
                       low = keep⊙(dS·A)/(1-p)  [M, K]    Triton skinny kernel, the mask regenerated from the seed
                       dX = low + dY·W0                   cuBLAS: low.addmm_(dY, W0)
                       dA = dSᵀ·dropout(x)                Triton dA kernel

The low-rank term enters cuBLAS as its C input, never as a second read-modify-write pass over y. Bytes per pass
beyond the fused Triton GEMM (e = element size): forward writes C and cuBLAS reads it back, 2·M·N·e; backward
the same for low, 2·M·K·e. Same decomposition, same dropout stream and same S as the other backends, so a
forward of one backend and a backward of another agree (the measured auto choice, fastpeft/ops/lora_linear_auto.py,
picks each pass separately).

Layouts: x, dY and W0 go to cuBLAS as they are (torch.addmm copies an operand only when neither it nor its
transpose is row-major with unit stride, e.g. a column-strided x); the Triton kernels take every stride.
"""
from __future__ import annotations

from ..kernels.lora_linear import lora_bwd_da, lora_bwd_dy, lora_shrink
from ..kernels.lora_skinny import lora_expand


def lora_linear_fwd_cublas(x, weight, lora_a, lora_b, bias, scaling: float, p: float, seed, thr: int, mask=None):
    """Forward on 2-D x [M, K]: returns (y [M, N] in x's dtype, S [M, R] in x's dtype, saved for backward).
    mask: a uint8 [M, ceil(K/8)] tensor the shrink fills with the keep bits (dropout_mask="packed"), or None."""
    s = lora_shrink(x, lora_a, p, seed, thr, mask)
    c = lora_expand(s, lora_b, bias, scaling, x.dtype)  # C = s·S·Bᵀ + bias, written once
    y = c.addmm_(x, weight.t())  # y = C + x·W0ᵀ, in C's memory
    return y, s


def lora_linear_bwd_cublas(dy, x, weight, lora_a, lora_b, s, scaling: float, p: float, seed, thr: int, needs,
                           mask=None):
    """Backward on 2-D tensors. needs = (dx, dA, dB, dbias) flags; returns those four (None where not needed).
    mask: the forward's packed keep bits (dropout_mask="packed"), read instead of regenerating the mask."""
    need_dx, need_da, need_db, need_dbias = needs
    ds, db, dbias = lora_bwd_dy(dy, lora_b, s, scaling, need_dx or need_da, need_db, need_dbias)
    if ds is not None:  # both consumers multiply dS in dY's dtype, as the fused path does
        ds = ds.to(dy.dtype)
    dx = da = None
    if need_dx:
        # low = keep⊙(dS·A)/(1-p): Rmᵀ = Aᵀ as a view; the mask is x's (rows M, columns K)
        low = lora_expand(ds, lora_a.t(), None, 1.0 / (1.0 - p), dy.dtype, (seed, thr) if p > 0 else None, mask)
        dx = low.addmm_(dy, weight)  # dX = low + dY·W0
    if need_da:
        da = lora_bwd_da(x, ds, p, seed, thr, mask).to(lora_a.dtype)
    if db is not None:
        db = db.to(lora_b.dtype)
    if dbias is not None:
        dbias = dbias.to(dy.dtype)
    return dx, da, db, dbias


__all__ = ["lora_linear_fwd_cublas", "lora_linear_bwd_cublas"]
