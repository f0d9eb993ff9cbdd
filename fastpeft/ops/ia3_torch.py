"""The PyTorch backend of IA3 on a frozen linear: the kernels' math in plain torch ops (the CPU path).

Same signatures as kernels/ia3.py; fp32 scaling, rounded once to x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ia3_fwd_torch(x, weight, bias, scale, mode: str, out=None):
    """y [M, N] in x's dtype, written into `out` when given."""
    dt = x.dtype
    if mode == "output":
        y = F.linear(x, weight).float().add_(0 if bias is None else bias.float()).mul_(scale.float())
        return y.to(dt) if out is None else out.copy_(y)
    xs = (x.float() * scale.float()).to(dt)
    if out is None:
        return F.linear(xs, weight, bias)
    return torch.mm(xs, weight.t(), out=out) if bias is None else torch.addmm(bias, xs, weight.t(), out=out)


def ia3_bwd_torch(dy, x, weight, bias, scale, mode: str, need_dx: bool, need_dl: bool):
    dt = dy.dtype
    l = scale.float()
    dx = dl = None
    if mode == "output":
        if need_dx:
            dx = (dy.float() * l).to(dt) @ weight
        if need_dl:  # the pre-scale product recomputed, never y / l (see kernels/ia3.py)
            dl = (dy.float() * F.linear(x, weight, bias).float()).sum(0)
    else:
        dxs = dy @ weight
        if need_dx:
            dx = (dxs.float() * l).to(dt)
        if need_dl:
            dl = (x.float() * dxs.float()).sum(0)
    return dx, dl
