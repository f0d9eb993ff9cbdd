"""The "cublas" backend of the gradient-free GaLore linear's backward: the projected gradient by cuBLAS.

dX = dY·W is cuBLAS in every backend (GaLoreLinearFunction). The weight gradient G = dYᵀ·X is never formed;
for X [M, in], dY [M, out] and the basis P [out, r] (left) and/or Q [r, in] (right):
    S = dY·P  or  T = X·Qᵀ      [M, r]   the skinny product: Triton (kernels/lora_linear.py `lora_shrink`,
                                        one read of dY or X) up to rank LORA_MAX_RANK_TRITON, cuBLAS above
    R += Sᵀ·X, dYᵀ·T or Sᵀ·T           cuBLAS with the fp32 R as its C input and output (beta = 1, fp32
                                        accumulation of 16-bit operands: torch.addmm(..., out_dtype=fp32))
Bytes (e = element size): one read of dY (or X) for the skinny product, one read of X (or dY) and of S (or
T) for the GEMM, R read and written once in its epilogue (r·in·4 or out·r·4, small next to M·in·e): no
[out, in] tensor, no [r, in]-sized temporary. The Triton backend computes the second product with its own
skinny-result kernel (kernels/galore.py `galore_project`), the same bytes.
The exact-SVD refresh step accumulates the full G (fp32 [out, in], by design) the same way: G += dYᵀ·X.

A torch without the out_dtype form of addmm (before 2.8), or one that refuses an fp32 C for 16-bit operands,
gets R += (S·X in the operands' dtype), the torch backend's rounding; detected once, on the first call.
On CPU tensors (the tests, under TRITON_INTERPRET=1) 16-bit operands are multiplied in fp32 (the same math).
"""
from __future__ import annotations

import torch

from ..limits import LORA_MAX_RANK_TRITON

_F32_ACCUMULATE = True  # torch.addmm(out_fp32, a16, b16, out_dtype=float32, out=out) works; cleared on first refusal


def accumulate_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out (fp32, in place) += a·b by cuBLAS with out as its C input (beta = 1), accumulating in fp32."""
    global _F32_ACCUMULATE
    if a.dtype == torch.float32:
        return out.addmm_(a, b)
    if out.device.type != "cuda":  # torch has no out_dtype matmul on the CPU
        return out.addmm_(a.float(), b.float())
    if _F32_ACCUMULATE:
        try:  # the argument checks run before any launch: a refusal changes nothing
            return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):
            _F32_ACCUMULATE = False
    return out.add_(torch.mm(a, b))


def _skinny(act: torch.Tensor, basis_t: torch.Tensor) -> torch.Tensor:
    """act·basis_tᵀ [M, r] in act's dtype, basis_t [r, n] at any strides."""
    if basis_t.shape[0] <= LORA_MAX_RANK_TRITON:
        from ..kernels.lora_linear import lora_shrink

        return lora_shrink(act, basis_t, 0.0, 0, 0)
    return act @ basis_t.t().to(act.dtype)


def projected_grad_accumulate_cublas(x2, dy2, p, q, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) += Pᵀ·G, G·Qᵀ or Pᵀ·G·Qᵀ for G = dy2ᵀ·x2; x2 [M, in] and dy2 [M, out] in one dtype."""
    if x2.shape[0] == 0:
        return out
    left = _skinny(dy2, p.t()) if p is not None else dy2  # dY·P
    right = _skinny(x2, q) if q is not None else x2  # X·Qᵀ
    return accumulate_f32(out, left.t(), right)


def full_grad_accumulate_cublas(x2, dy2, out: torch.Tensor) -> torch.Tensor:
    """out (fp32 [out, in]) += dy2ᵀ·x2: only on an exact-SVD refresh step."""
    if x2.shape[0] == 0:
        return out
    return accumulate_f32(out, dy2.t(), x2)


__all__ = ["projected_grad_accumulate_cublas", "full_grad_accumulate_cublas", "accumulate_f32"]
