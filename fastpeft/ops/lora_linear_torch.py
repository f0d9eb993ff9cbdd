"""The PyTorch backend of the fused LoRA linear: the kernels' decomposition in plain torch ops.

Same signatures, same saved tensors (x, S, seed) and the same dropout stream as kernels/lora_linear.py,
so the two backends are interchangeable within one training run. This is the CPU path.
"""
from __future__ import annotations

import torch

from ..dropout import dropout_keep_mask


def _dropped(x: torch.Tensor, p: float, seed: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    if keep is None:
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) * (1.0 / (1.0 - p))


def lora_shrink_torch(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """S = dropout(x)·Aᵀ [M, R] in x's dtype, differentiable in x and A."""
    xd = _dropped(x, p, seed) if p > 0 else x
    return xd @ lora_a.to(x.dtype).t()


def lora_linear_fwd_torch(x, weight, lora_a, lora_b, bias, scaling: float, p: float, seed: int, thr: int = 0):
    """Forward on 2-D x [M, K] (any strides): returns (y [M, N], S [M, R]) in x's dtype."""
    s = lora_shrink_torch(x, lora_a, p, seed)
    y = torch.nn.functional.linear(x, weight, bias)
    y.addmm_(s, lora_b.to(x.dtype).t(), alpha=scaling)
    return y, s


def lora_linear_bwd_torch(dy, x, weight, lora_a, lora_b, s, scaling: float, p: float, seed: int, thr: int, needs):
    """Backward on 2-D tensors; needs = (dx, dA, dB, dbias). Returns those four (None where not needed)."""
    need_dx, need_da, need_db, need_dbias = needs
    dx = da = db = dbias = None
    # the mask is regenerated once per backward, for both dX's and dA's low-rank terms (never stored)
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device) if p > 0 and (need_dx or need_da) else None
    if need_dx or need_da:
        ds = (dy @ lora_b.to(dy.dtype)) * scaling
    if need_db:
        db = ((dy.t() @ s) * scaling).to(lora_b.dtype)
    if need_dx:
        low = ds @ lora_a.to(dy.dtype)
        if p > 0:
            low = _dropped(low, p, seed, keep)  # the forward's mask and 1/(1-p), applied to dS·A
        dx = dy @ weight
        dx += low
    if need_da:
        xd = _dropped(x, p, seed, keep) if p > 0 else x
        da = (ds.t() @ xd).to(lora_a.dtype)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, da, db, dbias
