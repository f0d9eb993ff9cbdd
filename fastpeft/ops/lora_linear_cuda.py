"""The "cuda" backend of the LoRA linear: csrc/ kernels for the skinny passes, cuBLAS for the base GEMMs.

Forward on x [M, K] (e = element size):
  M <= 16:  (y, S) = lora_decode_cuda            one launch: W0 read once, S = dropout(x)·Aᵀ recomputed per block
                                                 (block 0 stores it), y = x·W0ᵀ + bias + s·S·Bᵀ
  M > 16:   S = dropout(x)·Aᵀ                    CUDA shrink, one read of x
            C = s·S·Bᵀ + bias     [M, N]         CUDA expand, written once in x's dtype
            y = C + x·W0ᵀ                        cuBLAS: C.addmm_(x, W0ᵀ), C read once in the epilogue (beta=1)
                                                 and overwritten by y in place
Backward:   dS = s·dY·B, dB                      CUDA dY pass, one read of dY (two at large r·M and r·N, where
                                                 the <= 4 MiB partials would leave the GPU idle; dbias: dY.sum(0))
            low = keep⊙(dS·A)/(1-p)  [M, K]      CUDA expand, the mask regenerated from the seed
            dX = low + dY·W0                     cuBLAS: low.addmm_(dY, W0)
            dA = dSᵀ·dropout(x)                  CUDA dA pass (fp32, fixed-order partials, <= 4 MiB workspace);
                                                 without dropout cuBLAS's dSᵀ·x

Bytes beyond a fused GEMM: the expand writes C once (M·N·e, a memory-bound pass) and cuBLAS reads it back in the
epilogue of its compute-bound GEMM (M·N·e, overlapped with the math); the old y.addmm_(S, Bᵀ) after the GEMM was a
memory-bound pass of its own reading and writing y (2·M·N·e). The backward's low: the same, M·K·e each way. No
dropout mask is ever stored: every kernel regenerates it from (seed, row, col) with the stream of kernels/philox.py,
so the mask bits equal the Triton backend's and the PyTorch twin's (fastpeft.dropout.dropout_keep_mask).
Adapters in another dtype (e.g. fp32 over bf16 x) are cast to x's dtype for the kernels (two small copies).

Layouts: every tensor reaches the csrc kernels with its own strides (csrc/bindings.cpp passes stride(0) and
stride(1), bias's stride included; the tile loaders use 16-byte vectors only where the row is unit-stride and
aligned, scalar loads otherwise, so expanded and overlapping rows read correctly), and cuBLAS takes the rest
through torch. So no argument is copied here for its layout; empty M or out_features never reach this file.

The seed: the csrc kernels take a host int, so a tensor seed (fastpeft.dropout.draw_seed under CUDA graph
capture, or a compiled graph's) is read with int() there, which syncs, and which capture would bake into the
graph (one mask for every replay): inside capture it raises instead (`_host_seed`), in forward and backward.
"""
from __future__ import annotations

import torch

from .cuda_ops import MAX_DECODE_ROWS, lora_bwd_da_cuda, lora_decode_cuda, lora_dy_reduce_cuda, lora_expand_cuda, \
    lora_shrink_cuda


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
    """Forward on 2-D x [M, K]: returns (y [M, N], S [M, R]), both in x's dtype (S is saved for backward)."""
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    seed = _host_seed(seed) if p > 0 else 0
    if bias is not None:
        bias = bias.to(x.dtype)
    if x.shape[0] <= MAX_DECODE_ROWS:
        return lora_decode_cuda(x, weight, bias, a, b, scaling, p, seed)
    s = lora_shrink_cuda(x, a, p, seed)
    c = lora_expand_cuda(s, b.t(), bias, scaling)  # C = s·S·Bᵀ + bias, written once
    return c.addmm_(x, weight.t()), s  # y = C + x·W0ᵀ, in C's memory


def lora_linear_bwd_cuda(dy, x, weight, lora_a, lora_b, s, scaling: float, p: float, seed, thr: int, needs):
    """Backward on 2-D tensors. needs = (dx, dA, dB, dbias) flags; returns those four (None where not needed)."""
    need_dx, need_da, need_db, need_dbias = needs
    dx = da = db = dbias = None
    if need_dx or need_da or need_db:
        seed = _host_seed(seed) if p > 0 and (need_dx or need_da) else 0
        ds, db32 = lora_dy_reduce_cuda(dy, lora_b.to(dy.dtype), s, scaling)
        ds = ds.to(dy.dtype)  # both consumers multiply dS in dY's dtype, as the other backends do
        if need_dx:
            low = lora_expand_cuda(ds, lora_a.to(dy.dtype), None, 1.0 / (1.0 - p), p, seed)  # keep⊙(dS·A)/(1-p)
            dx = low.addmm_(dy, weight)  # dX = low + dY·W0, in low's memory
        if need_da:
            da = (lora_bwd_da_cuda(x, ds, p, seed) if p > 0 else ds.t() @ x).to(lora_a.dtype)
        if need_db:
            db = db32.to(lora_b.dtype)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, da, db, dbias


__all__ = ["lora_linear_fwd_cuda", "lora_linear_bwd_cuda"]
