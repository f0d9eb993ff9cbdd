"""The PyTorch backend of the DoRA linear (ops/dora_linear.py), and the weight norm every backend shares.

HF PEFT's DoRA (use_dora=True), on rows x [M, in]:

    y = x·W0ᵀ + b + (g − 1)⊙(xd·W0ᵀ) + g⊙(s·(xd·Aᵀ)·Bᵀ),   g = m / ‖W0 + s·B·A‖ (per output row, detached)

with xd = dropout(x) (xd = x without dropout, where y = g⊙(x·W0ᵀ + s·S·Bᵀ) + b). The norm never forms
W0 + s·B·A: for row i, ‖w_i + s·b_i·A‖² = ‖w_i‖² + 2s·b_i·(A·w_iᵀ) + s²·b_i·(A·Aᵀ)·b_iᵀ, where ‖w_i‖² is cached by
the layers (W0 is frozen), A·W0ᵀ [r, out] is one skinny product and A·Aᵀ [r, r] a tiny one (`dora_norm`).

The forward returns y, S = xd·Aᵀ and V = xd·W0ᵀ + s·S·Bᵀ (the output before its column scale, saved for the
magnitude's gradient only when that is asked for). The backward, with dY:
    dV = dY⊙g    dS = s·dV·B    dB = s·dVᵀ·S    dA = dSᵀ·xd    dm = Σ_rows(dY⊙V) / ‖·‖    dbias = Σ_rows dY
    dX = dV·W0 + dS·A                                   (no dropout)
    dX = dY·W0 + keep⊙((dY⊙(g − 1))·W0 + dS·A)/(1 − p)   (dropout: PEFT's base term goes through the mask)
"""
from __future__ import annotations

import torch

from .lora_linear_torch import _dropped, lora_linear_bwd_torch, lora_linear_fwd_torch

_CHUNK_ELEMENTS = 1 << 22  # fp32 elements of a row block's temporaries (16 MiB): far below any [M, out] or [out, in]
_F32 = torch.float32


def _row_blocks(rows: int, cols: int):
    """Row ranges of at most _CHUNK_ELEMENTS elements, and at most half the rows: a block's temporary is never
    the size of the whole matrix."""
    step = max(1, min((rows + 1) // 2, _CHUNK_ELEMENTS // max(1, cols)))
    return ((i, min(rows, i + step)) for i in range(0, rows, step))


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖w_i‖² per row of W0 [out, in], fp32 [out]: one read of W0, accumulated in fp32, no [out, in] temporary."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=_F32).square_()


def _a_wt(weight: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """A·W0ᵀ [r, out] in fp32 (float64 for a float64 W0), without an fp32 copy of a 16-bit W0."""
    if weight.dtype in (_F32, torch.float64):
        return lora_a.to(weight.dtype) @ weight.t()
    if weight.device.type == "cuda":
        try:  # 16-bit tensor-core products with fp32 outputs; an fp32 A as two 16-bit parts (hi + lo), one read of W0
            hi = lora_a.to(weight.dtype)
            if lora_a.dtype != _F32:
                return torch.mm(hi, weight.t(), out_dtype=_F32)
            r = lora_a.shape[0]
            aw = torch.mm(torch.cat([hi, (lora_a - hi.to(_F32)).to(weight.dtype)]), weight.t(), out_dtype=_F32)
            return aw[:r] + aw[r:]
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm(out_dtype=): row blocks below
            pass
    a32 = lora_a.to(_F32)
    aw = a32.new_empty((a32.shape[0], weight.shape[0]))
    for i, j in _row_blocks(weight.shape[0], weight.shape[1]):
        torch.mm(a32, weight[i:j].to(_F32).t(), out=aw[:, i:j])
    return aw


def dora_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              w_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W0 + s·B·A‖ per output row, fp32 [out] (float64 for a float64 W0), never forming W0 + s·B·A (see the
    module docstring).

    w_sq: ‖w_i‖² (weight_sq_norm(weight)), computed here when None. Cost: 2·r·in·out FLOPs and one read of W0 for
    A·W0ᵀ, 2·r²·in for A·Aᵀ, O(out·r²) for the rest; temporaries [r, out] and [out, r]."""
    acc = torch.float64 if weight.dtype == torch.float64 else _F32
    if w_sq is None:
        w_sq = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square_()
    aw = _a_wt(weight, lora_a)  # [r, out]
    a32, b32 = lora_a.to(acc), lora_b.to(acc)
    gram = a32 @ a32.t()  # [r, r]
    cross = torch.linalg.vecdot(b32, aw.t())  # b_i·(A·w_iᵀ)
    quad = torch.linalg.vecdot(b32 @ gram, b32)  # b_i·(A·Aᵀ)·b_iᵀ
    n2 = w_sq.to(acc) + (2.0 * scaling) * cross + (scaling * scaling) * quad
    return n2.clamp_min_(0.0).sqrt_()


def col_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_rows a⊙b per column, fp32 [N], for a, b [M, N]: in row blocks (temporaries of a block's size), the products
    in the inputs' dtype, summed in fp32."""
    out = torch.zeros(a.shape[1], dtype=_F32, device=a.device)
    for i, j in _row_blocks(a.shape[0], a.shape[1]):
        out += torch.mul(a[i:j], b[i:j]).sum(0, dtype=_F32)
    return out


def scale_columns(v: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """g⊙v + bias as a new tensor in v's dtype, computed in fp32."""
    y = torch.mul(v, g)  # g fp32 [N]: the product is fp32
    if bias is not None:
        y += bias
    return y if y.dtype == v.dtype else y.to(v.dtype)


def dora_linear_fwd_torch(x, weight, lora_a, lora_b, bias, g, scaling: float, p: float, seed, thr: int = 0,
                          save_pre: bool = True):
    """Forward on 2-D x [M, in] (any strides), g = m/‖W0 + s·B·A‖ fp32 [out]: returns (y, S, V or None) in x's dtype."""
    if p == 0:
        v, s = lora_linear_fwd_torch(x, weight, lora_a, lora_b, None, scaling, 0.0, 0)
        return scale_columns(v, g, bias), s, (v if save_pre else None)
    xd = _dropped(x, p, seed)
    b_t = lora_b.to(x.dtype).t()
    s = xd @ lora_a.to(x.dtype).t()
    v = xd @ weight.t()
    v.addmm_(s, b_t, alpha=scaling)
    y = torch.nn.functional.linear(x, weight, bias)
    y.addmm_(s, b_t, alpha=scaling)
    y += v * (g - 1.0)
    return y, s, (v if save_pre else None)


def dora_linear_bwd_torch(dy, x, weight, lora_a, lora_b, s, v, g, norm, scaling: float, p: float, seed, thr: int,
                          needs):
    """Backward on 2-D tensors; needs = (dx, dA, dB, dm, dbias). Returns those five (None where not needed):
    dm and dbias in fp32, the others in their tensors' dtypes."""
    need_dx, need_da, need_db, need_dm, need_dbias = needs
    dx = da = db = dm = dbias = None
    dt = dy.dtype
    dvg = (dy * g).to(dt)
    if p == 0:
        if need_dx or need_da or need_db:
            dx, da, db, _ = lora_linear_bwd_torch(dvg, x, weight, lora_a, lora_b, s, scaling, 0.0, 0, 0,
                                                  (need_dx, need_da, need_db, False))
    else:
        if need_dx or need_da:
            ds = (dvg @ lora_b.to(dt)) * scaling
        if need_db:
            db = ((dvg.t() @ s) * scaling).to(lora_b.dtype)
        if need_dx:
            low = (dy * (g - 1.0)).to(dt) @ weight
            low.addmm_(ds, lora_a.to(dt))
            dx = dy @ weight
            dx += _dropped(low, p, seed)
        if need_da:
            da = (ds.t() @ _dropped(x, p, seed)).to(lora_a.dtype)
    if need_dm:
        dm = col_dot(dy, v) / norm
    if need_dbias:
        dbias = dy.sum(0, dtype=_F32)
    return dx, da, db, dm, dbias


__all__ = ["weight_sq_norm", "dora_norm", "col_dot", "scale_columns", "dora_linear_fwd_torch",
           "dora_linear_bwd_torch"]
