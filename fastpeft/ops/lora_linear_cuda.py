"""The "cuda" backend of the LoRA linear: csrc/ kernels for the skinny passes, cuBLAS for the base GEMMs.

Forward: S = dropout(x)·Aᵀ by the CUDA shrink (the kernels' seeded stream), y = x·W0ᵀ + bias by cuBLAS,
then y += s·S·Bᵀ (an addmm: one extra pass over y that the Triton GEMM's epilogue avoids); M <= 16 without
dropout takes the one-launch decode kernel instead. Backward: one CUDA pass over dY for dS and dB, cuBLAS for
dY·W0 and the rank-r products; the dropout mask of dX's and dA's low-rank terms comes from the PyTorch twin
of the stream. Same signatures as the other backends; adapters in fp32 are cast to x's dtype for the kernels.

Layouts: every tensor reaches the csrc kernels with its own strides (csrc/bindings.cpp passes stride(0) and
stride(1), bias's stride included; the tile loaders use 16-byte vectors only where the row is unit-stride and
aligned, scalar loads otherwise, so expanded and overlapping rows read correctly), and cuBLAS takes the rest
through torch. So no argument is copied here for its layout; empty M or out_features never reach this file.

The seed: the csrc shrink takes a host int, so a tensor seed (fastpeft.dropout.draw_seed under CUDA graph
capture, or a compiled graph's) is read with int() there, which syncs, and which capture would bake into the
graph (one mask for every replay): inside capture it raises instead (`_host_seed`). Backward's masks come from
the PyTorch twin, which reads a tensor seed on the device.
"""
from __future__ import annotations

import torch

from .cuda_ops import MAX_DECODE_ROWS, lora_decode_cuda, lora_dy_reduce_cuda, lora_shrink_cuda
from ..dropout import dropout_keep_mask
from .lora_linear_torch import _dropped


def _host_seed(seed) -> int:
    """The seed as the csrc kernels take it: an int as it is, a tensor read on the host, never inside capture."""
    if not isinstance(seed, torch.Tensor):
        return seed
    if seed.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("backend='cuda' cannot take a dropout seed inside CUDA graph capture: its kernels read "
                           "the seed on the host, so the graph would replay one dropout mask forever; use "
                           "backend='triton', whose kernels read the seed on the device, or capture without "
                           "dropout (eval, dropout_p=0)")
    return int(seed)


def lora_linear_fwd_cuda(x, weight, lora_a, lora_b, bias, scaling: float, p: float, seed, thr: int = 0):
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    s = lora_shrink_cuda(x, a, p, _host_seed(seed) if p > 0 else 0)
    if p == 0 and x.shape[0] <= MAX_DECODE_ROWS:
        return lora_decode_cuda(x, weight, bias, a, b, scaling), s
    y = torch.nn.functional.linear(x, weight, bias)
    y.addmm_(s, b.t(), alpha=scaling)
    return y, s


def lora_linear_bwd_cuda(dy, x, weight, lora_a, lora_b, s, scaling: float, p: float, seed, thr: int, needs):
    need_dx, need_da, need_db, need_dbias = needs
    dx = da = db = dbias = None
    ds, db32 = lora_dy_reduce_cuda(dy, lora_b.to(dy.dtype), s, scaling)
    ds = ds.to(dy.dtype)
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device) if p > 0 and (need_dx or need_da) else None
    if need_dx:
        low = ds @ lora_a.to(dy.dtype)
        if p > 0:
            low = _dropped(low, p, seed, keep)
        dx = torch.addmm(low, dy, weight)
    if need_da:
        da = (ds.t() @ (_dropped(x, p, seed, keep) if p > 0 else x)).to(lora_a.dtype)
    if need_db:
        db = db32.to(lora_b.dtype)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, da, db, dbias
