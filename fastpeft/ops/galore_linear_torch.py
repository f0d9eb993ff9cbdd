"""PyTorch backend of the gradient-free GaLore linear: R = Pᵀ·G, G·Qᵀ or Pᵀ·G·Qᵀ for G = dYᵀ·X, never G.

Each product keeps one operand skinny ([M, r]); the m×n gradient is never formed. The per-micro-batch R is
computed in the activations' dtype and added to the fp32 accumulator (the Triton backend accumulates in
fp32 inside the kernel instead).
"""
from __future__ import annotations

import torch


def projected_grad_accumulate_torch(x2: torch.Tensor, dy2: torch.Tensor, p, q, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) += projection of dy2ᵀ·x2 onto basis (p, q); x2 [M, n], dy2 [M, m]."""
    if p is not None and q is not None:
        r = (dy2 @ p.to(dy2.dtype)).t() @ (x2 @ q.t().to(x2.dtype))  # (dY·P)ᵀ·(X·Qᵀ) = Pᵀ·G·Qᵀ
    elif p is not None:
        r = (dy2 @ p.to(dy2.dtype)).t() @ x2  # (dY·P)ᵀ·X = Pᵀ·G
    else:
        r = dy2.t() @ (x2 @ q.t().to(x2.dtype))  # dYᵀ·(X·Qᵀ) = G·Qᵀ
    return out.add_(r)


def full_grad_accumulate_torch(x2: torch.Tensor, dy2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32 [m, n]) += dy2ᵀ·x2: only on an exact-SVD refresh step."""
    return out.add_(dy2.t() @ x2)
