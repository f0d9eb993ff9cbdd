"""The Triton backend of the DoRA linear: kernels/lora_linear.py's launchers, with the GEMM's per-column scale.

Same signatures and results as ops/dora_linear_torch.py (see its docstring for the formulas). Without dropout
a training forward is two launches, the shrink S = x·Aᵀ and one GEMM whose epilogue stores y = g⊙V + b and, when
the magnitude needs its gradient, V itself; the backward is the one-pass dY kernel (dS with B's rows scaled by
g, dB, dbias), one GEMM dX = (dY⊙g)·W0 + dS·A with g applied to dY's tiles as they load, and the dA kernel.
dm = Σ_rows(dY⊙V)/‖·‖ is a row-blocked reduction in PyTorch.

With dropout, PEFT's base term (g − 1)⊙(dropout(x)·W0ᵀ) needs dropout(x) itself as a GEMM operand, which the
kernels do not form: it is materialised (as PEFT does) by the dropout stream's PyTorch path, and the backward's
masked term likewise; the masks are the kernels' own (same seed, same bits).
"""
from __future__ import annotations

import torch

from .dora_linear_torch import col_dot
from .lora_linear_torch import _dropped


def _k():
    from ..kernels import lora_linear as k

    return k


def dora_linear_fwd_triton(x, weight, lora_a, lora_b, bias, g, scaling: float, p: float, seed, thr: int = 0,
                           save_pre: bool = True):
    """Forward on 2-D x [M, in]: (y, S, V or None), as dora_linear_fwd_torch."""
    k = _k()
    s = k.lora_shrink(x, lora_a, p, seed, thr)
    if p == 0:
        r = k.lora_gemm(x, weight, s, lora_b, bias, scaling, None, col=g, store_pre=save_pre)
        return (r[0], s, r[1]) if save_pre else (r, s, None)
    xd = _dropped(x, p, seed)  # materialised: a GEMM operand (see the module docstring)
    r = k.lora_gemm(xd, weight, s, lora_b, None, scaling, None, col=g - 1.0, store_pre=save_pre)
    z, v = r if save_pre else (r, None)  # z = (g − 1)⊙V
    y = k.lora_gemm(x, weight, s, lora_b, bias, scaling, None)  # x·W0ᵀ + s·S·Bᵀ + b
    y += z
    return y, s, v


def dora_linear_bwd_triton(dy, x, weight, lora_a, lora_b, s, v, g, norm, scaling: float, p: float, seed, thr: int,
                           needs):
    """Backward on 2-D tensors; needs = (dx, dA, dB, dm, dbias), as dora_linear_bwd_torch."""
    k = _k()
    need_dx, need_da, need_db, need_dm, need_dbias = needs
    dx = da = db = dm = None
    # dS = s·(dY⊙g)·B = s·dY·(g⊙B) and dB = s·(dY⊙g)ᵀ·S = g⊙(s·dYᵀ·S): one read of dY for both, and for dbias
    ds, db, dbias = k.lora_bwd_dy(dy, lora_b.float() * g[:, None], s, scaling, need_dx or need_da, need_db,
                                  need_dbias)
    if ds is not None:
        ds = ds.to(dy.dtype)
    if need_dx:
        wt, at = weight.t(), lora_a.t()
        if p == 0:  # dX = (dY⊙g)·W0 + dS·A: g scales dY's tiles as the GEMM loads them
            dx = k.lora_gemm(dy, wt, ds, at, None, 1.0, None, col=g, col_mode="prologue")
        else:  # dX = dY·W0 + keep⊙((dY⊙(g − 1))·W0 + dS·A)/(1 − p)
            low = k.lora_gemm(dy, wt, ds, at, None, 1.0, None, col=g - 1.0, col_mode="prologue")
            dx = dy @ weight
            dx += _dropped(low, p, seed)
    if need_da:
        da = k.lora_bwd_da(x, ds, p, seed, thr).to(lora_a.dtype)
    if db is not None:
        db = (db * g[:, None]).to(lora_b.dtype)
    if need_dm:
        dm = col_dot(dy, v) / norm
    return dx, da, db, dm, dbias


__all__ = ["dora_linear_fwd_triton", "dora_linear_bwd_triton"]
