"""The PyTorch backend of IA3 on a frozen linear: the kernels' math in plain torch ops (the CPU path).

Same signatures and saved tensors as kernels/ia3.py; fp32 scaling, rounded once to x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ia3_fwd_torch(x, weight, bias, scale, mode: str):
    dt = x.dtype
    if mode == "output":
        return (F.linear(x, weight).float().add_(0 if bias is None else bias.float()).mul_(scale.float())).to(dt)
    return F.linear((x.float() * scale.float()).to(dt), weight, bias)


def ia3_bwd_torch(dy, x, y, weight, bias, scale, mode: str, need_dx: bool, need_dl: bool):
    dt = dy.dtype
    l = scale.float()
    dx = dl = None
    if mode == "output":
        if need_dx:
            dx = (dy.float() * l).to(dt) @ weight
        if need_dl:
            zero = l == 0
            y0 = y.float() / torch.where(zero, torch.ones_like(l), l)
            if bool(zero.any()):  # a host sync, on this reference path only: y holds nothing where l == 0
                y0 = torch.where(zero, F.linear(x, weight, bias).float(), y0)
            dl = (dy.float() * y0).sum(0)
    else:
        dxs = dy @ weight
        if need_dx:
            dx = (dxs.float() * l).to(dt)
        if need_dl:
            dl = (x.float() * dxs.float()).sum(0)
    return dx, dl
