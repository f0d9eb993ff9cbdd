"""The PyTorch backend of the fused LoRA linear: the kernels' decomposition in plain torch ops.

Same signatures, same saved tensors (x, S, seed) and the same dropout stream as kernels/lora_linear.py,
so the two backends are interchangeable within one training run. This is the CPU path.

On CPU tensors, where autograd needs no graph of the computation itself (always, but for double backward),
the same ops run in one C++ call per pass (fastpeft._C_cpu.lora_fwd / lora_bwd, csrc/cpu/lora_cpu.cpp: the
same bits, without a Python round trip per op), and dropout there runs in C++ (fastpeft.dropout_cpu: the mask
computed on the fly, one pass for both of the backward's uses). The Python below is the fallback and the
oracle: the same bits either way.
"""
from __future__ import annotations

import torch

from .. import _ext_cpu
from ..dropout import dropout_keep_mask, pack_keep_mask, unpack_keep_mask
from ..dropout_cpu import dropped, dropped_pair, twin_dropped

_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _cpp(x: torch.Tensor, seed):
    """The C++ module when these rows may go to it (CPU, a supported dtype, an int seed, no graph wanted)."""
    if (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in _DTYPES and type(seed) is int
            and not torch.is_grad_enabled()):
        return _ext_cpu.get()
    return None


def _dropped(x: torch.Tensor, p: float, seed: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """x * keep / (1 - p) on rows [M, K]: with a given keep-mask by the twin's formula (the cuda backend's use),
    else through fastpeft.dropout_cpu (C++ on CPU tensors, the twin elsewhere)."""
    if keep is not None:
        return twin_dropped(x, p, seed, keep)
    return dropped(x, p, seed)


def lora_shrink_torch(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """S = dropout(x)·Aᵀ [M, R] in x's dtype, differentiable in x and A."""
    xd = _dropped(x, p, seed) if p > 0 else x
    return xd @ _as(lora_a, x.dtype).t()


def lora_linear_fwd_torch(x, weight, lora_a, lora_b, bias, scaling: float, p: float, seed: int, thr: int = 0,
                          mask=None):
    """Forward on 2-D x [M, K] (any strides): returns (y [M, N], S [M, R]) in x's dtype.

    mask: a uint8 [M, ceil(K/8)] tensor that receives the keep-mask as bits (dropout_mask="packed"), or None;
    with it the mask is drawn once by the PyTorch twin (the C++ kernels draw it on the fly and keep nothing)."""
    packed = mask is not None and p > 0
    ext = None if packed else _cpp(x, seed)
    if ext is not None:
        return ext.lora_fwd(x, weight, lora_a, lora_b, bias, scaling, p, seed, thr)
    if packed:
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
        mask.copy_(pack_keep_mask(keep))
        s = _dropped(x, p, seed, keep) @ _as(lora_a, x.dtype).t()
    else:
        s = lora_shrink_torch(x, lora_a, p, seed)
    y = torch.nn.functional.linear(x, weight, bias)
    y.addmm_(s, _as(lora_b, x.dtype).t(), alpha=scaling)
    return y, s


def lora_linear_bwd_torch(dy, x, weight, lora_a, lora_b, s, scaling: float, p: float, seed: int, thr: int, needs,
                          mask=None):
    """Backward on 2-D tensors; needs = (dx, dA, dB, dbias). Returns those four (None where not needed).
    mask: the forward's packed keep bits (dropout_mask="packed"), unpacked instead of regenerating the mask."""
    keep = unpack_keep_mask(mask, x.shape[1]) if mask is not None and p > 0 else None
    ext = _cpp(x, seed) if keep is None else None
    if ext is not None and type(dy) is torch.Tensor:
        return ext.lora_bwd(dy, x, weight, lora_a, lora_b, s, scaling, p, seed, thr, *needs)
    need_dx, need_da, need_db, need_dbias = needs
    dx = da = db = dbias = xd = None
    # the mask is regenerated once per backward, for both dX's and dA's low-rank terms (never stored):
    # dropped_pair computes it once for both
    if need_dx or need_da:
        ds = (dy @ _as(lora_b, dy.dtype)).mul_(scaling)
    if need_db:
        db = _as((dy.t() @ s).mul_(scaling), lora_b.dtype)
    if need_dx:
        a = _as(lora_a, dy.dtype)
        dx = dy @ weight
        if p > 0:  # the forward's mask and 1/(1-p) on dS·A; with dA wanted, dA's input under the same mask
            low = ds @ a
            if keep is not None:
                low = _dropped(low, p, seed, keep)
            elif need_da:
                xd, low = dropped_pair(x, low, p, seed)
            else:
                low = dropped(low, p, seed)
            dx += low
        else:
            dx.addmm_(ds, a)
    if need_da:
        if xd is None:
            xd = _dropped(x, p, seed, keep) if p > 0 else x
        da = _as(ds.t() @ xd, lora_a.dtype)
    if need_dbias:
        dbias = _as(dy.sum(0, dtype=torch.float32), dy.dtype)
    return dx, da, db, dbias
