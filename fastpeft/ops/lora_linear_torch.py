"""The PyTorch backend of the fused LoRA linear: the kernels' decomposition in plain torch ops.

Same signatures, same saved tensors (x, S, seed) and the same dropout stream as kernels/lora_linear.py,
so the two backends are interchangeable within one training run. This is the CPU path.

Dropout on CPU tensors runs in C++ (fastpeft.dropout_cpu: the mask computed on the fly, one pass for both of the
backward's uses), with the PyTorch twin of the stream as the fallback and the oracle: the same bits either way.
"""
from __future__ import annotations

import torch

from ..dropout_cpu import dropped, dropped_pair, twin_dropped


def _dropped(x: torch.Tensor, p: float, seed: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """x * keep / (1 - p) on rows [M, K]: with a given keep-mask by the twin's formula (the cuda backend's use),
    else through fastpeft.dropout_cpu (C++ on CPU tensors, the twin elsewhere)."""
    if keep is not None:
        return twin_dropped(x, p, seed, keep)
    return dropped(x, p, seed)


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
    dx = da = db = dbias = xd = None
    # the mask is regenerated once per backward, for both dX's and dA's low-rank terms (never stored):
    # dropped_pair computes it once for both
    if need_dx or need_da:
        ds = (dy @ lora_b.to(dy.dtype)) * scaling
    if need_db:
        db = ((dy.t() @ s) * scaling).to(lora_b.dtype)
    if need_dx:
        low = ds @ lora_a.to(dy.dtype)
        if p > 0 and need_da:  # the forward's mask and 1/(1-p), applied to dS·A, and dA's input, in one pass
            xd, low = dropped_pair(x, low, p, seed)
        elif p > 0:
            low = dropped(low, p, seed)
        dx = dy @ weight
        dx += low
    if need_da:
        if xd is None:
            xd = dropped(x, p, seed) if p > 0 else x
        da = (ds.t() @ xd).to(lora_a.dtype)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, da, db, dbias
