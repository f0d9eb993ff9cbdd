"""The PyTorch backend of the QLoRA linear (the CPU path and the Triton kernels' oracle).

The frozen base is bitsandbytes' 4-bit weight (NF4 or FP4), held here as a `Quant4`: the packed codes (two per
byte, the element of even flat index in the high nibble, over the row-major [out, in] weight), one absmax per
`blocksize` consecutive elements of that flat order (fp32, or with double quantization uint8 codes into the
nested table: absmax[b] = code2[q[b]] · absmax2[b // blocksize2] + offset, in fp32), and the 16-entry code table.
An element dequantizes to code[q] · absmax[flat // blocksize] in fp32, rounded to the compute dtype: the
bits of bitsandbytes' dequantize_4bit (tests/test_qlora.py checks them).

Never is the whole [out, in] weight dequantized: each pass walks W0 in blocks of output rows
(`row_block`), so the largest temporary in 16 or 32 bits is a [rows, in] block (half the rows at most).
Where quantization blocks tile the rows (in_features % blocksize == 0) the row blocks go through
bitsandbytes' own dequantize_4bit op (its C kernel on the CPU); otherwise through `_dequant_flat`, the same
arithmetic in torch ops as bitsandbytes' generic dequantize (bitsandbytes 0.50.2's CPU C kernel indexes the
scales per row, which is wrong when blocks straddle rows; its generic and CUDA paths index them flat).

Forward y = x·deq(W0)ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ, rounding deq(W0) straight to x's dtype (bitsandbytes'
gemm_4bit); backward dX = dY·deq(W0) + keep⊙(dS·A)/(1-p), deq(W0) rounded through the dtype the weight was
quantized from, then to dY's (bitsandbytes' MatMul4Bit.backward). Dropout is LoRA's seeded stream.
"""
from __future__ import annotations

import math
import sys
from typing import NamedTuple, Optional

import torch

from ..dropout_cpu import dropped

ROW_BLOCK_ELEMENTS = 1 << 20  # a dequantized row block holds at most this many elements (4 MiB in fp32)


class Quant4(NamedTuple):
    """A bitsandbytes 4-bit weight [out_features, in_features] as plain tensors (see the module docstring)."""
    packed: torch.Tensor            # uint8 [ceil(out·in / 2)]
    absmax: torch.Tensor            # fp32 [blocks], or uint8 [blocks] with double quantization
    code: torch.Tensor              # fp32 [16]
    absmax2: Optional[torch.Tensor]  # fp32 [ceil(blocks / blocksize2)] (double quantization), else None
    code2: Optional[torch.Tensor]    # fp32 [256] (double quantization), else None
    offset: Optional[torch.Tensor]   # fp32 0-d (double quantization), else None
    out_features: int
    in_features: int
    blocksize: int
    blocksize2: int                  # 0 without double quantization
    quant_type: str                  # "nf4" or "fp4"
    dtype: torch.dtype               # the dtype W0 was quantized from (the backward rounds through it)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def absmax_f32(q: Quant4) -> torch.Tensor:
    """Every block's absmax in fp32 ([blocks], small: out·in / blocksize); double quantization decoded as
    bitsandbytes does (dequantize_blockwise, then + offset, two roundings)."""
    if not q.nested:
        return q.absmax if q.absmax.dtype == torch.float32 else q.absmax.float()
    idx = torch.arange(q.absmax.numel(), device=q.absmax.device) // q.blocksize2
    return (q.code2[q.absmax.long()] * q.absmax2[idx]) + q.offset


def _dequant_flat(q: Quant4, amax: torch.Tensor, f0: int, f1: int) -> torch.Tensor:
    """fp32 values of the weight's flat elements [f0, f1): code[q] · absmax[flat // blocksize]."""
    b0, b1 = f0 // 2, (f1 + 1) // 2
    byt = q.packed[b0:b1]
    nib = torch.stack((byt >> 4, byt & 15), 1).view(-1)
    lo = f0 - 2 * b0
    vals = q.code[nib[lo:lo + f1 - f0].long()]
    a0, a1 = f0 // q.blocksize, (f1 - 1) // q.blocksize + 1
    first = f0 - a0 * q.blocksize
    scale = amax[a0:a1].repeat_interleave(q.blocksize)[first:first + f1 - f0]
    return vals * scale


def _bnb_op():
    bnb = sys.modules.get("bitsandbytes")
    return getattr(torch.ops, "bitsandbytes", None) if bnb is not None else None


def dequant_rows(q: Quant4, amax: torch.Tensor, n0: int, n1: int, dtype: torch.dtype,
                 via: torch.dtype | None = None, use_bnb: bool = True) -> torch.Tensor:
    """Rows [n0, n1) of deq(W0) as a [n1 - n0, in] tensor of `dtype`, rounded first to `via` if given."""
    k = q.in_features
    f0, f1 = n0 * k, n1 * k
    mid = via if via is not None else dtype
    ops = _bnb_op() if use_bnb else None
    # bitsandbytes 0.50's CPU kernel indexes the block scales per row (right only when blocks tile the rows:
    # in % blocksize == 0; its generic path, taken for odd in, and its CUDA kernel index them flat, as here)
    if (ops is not None and k % q.blocksize == 0 and q.packed.device.type == "cpu" and amax.dtype == torch.float32
            and mid in (torch.float32, torch.float16, torch.bfloat16)):  # (its kernel leaves other dtypes unwritten)
        a1 = (f1 - 1) // q.blocksize + 1
        w = ops.dequantize_4bit.default(q.packed[f0 // 2:f1 // 2], amax[f0 // q.blocksize:a1], q.blocksize,
                                        q.quant_type, [n1 - n0, k], mid)
    else:
        w = _dequant_flat(q, amax, f0, f1).view(n1 - n0, k).to(mid)
    return w if w.dtype == dtype else w.to(dtype)


def row_block(q: Quant4) -> int:
    """Rows of W0 dequantized at a time: at most ROW_BLOCK_ELEMENTS elements and at most half the rows (so
    never the whole [out, in] weight), a multiple of the rows that span whole quantization blocks where that
    fits (so blocks start aligned and go through bitsandbytes' op)."""
    n, k = q.out_features, q.in_features
    rows = max(1, min(ROW_BLOCK_ELEMENTS // k, (n + 1) // 2))
    align = q.blocksize // math.gcd(k, q.blocksize)
    if rows >= align:
        rows -= rows % align
    return rows


def dequantize(q: Quant4, dtype: torch.dtype) -> torch.Tensor:
    """The whole deq(W0) [out, in] (for tests and merging only: the passes never call it)."""
    amax = absmax_f32(q)
    return dequant_rows(q, amax, 0, q.out_features, dtype)


def qlora_shrink_torch(x, lora_a, p, seed):
    xd = dropped(x, p, seed) if p > 0 else x
    return xd @ (lora_a if lora_a.dtype == x.dtype else lora_a.to(x.dtype)).t()


def qlora_linear_fwd_torch(x, q: Quant4, lora_a, lora_b, bias, scaling: float, p: float, seed, thr: int = 0):
    """Forward on 2-D x [M, in]: (y [M, out], S [M, r]) in x's dtype; differentiable in x, A, B and bias."""
    s = qlora_shrink_torch(x, lora_a, p, seed)
    amax = absmax_f32(q)
    step = row_block(q)
    parts = [x @ dequant_rows(q, amax, n0, min(n0 + step, q.out_features), x.dtype).t()
             for n0 in range(0, q.out_features, step)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    if bias is not None:
        y = y + bias
    y = y + (s @ (lora_b if lora_b.dtype == x.dtype else lora_b.to(x.dtype)).t()) * scaling
    return y, s


def qlora_linear_bwd_torch(dy, x, q: Quant4, lora_a, lora_b, s, scaling: float, p: float, seed, thr: int, needs):
    """Backward on 2-D tensors; needs = (dx, dA, dB, dbias). Returns those four (None where not needed).
    Out of place throughout, so double backward differentiates it."""
    need_dx, need_da, need_db, need_dbias = needs
    dx = da = db = dbias = None
    if need_dx or need_da:
        ds = (dy @ lora_b.to(dy.dtype)) * scaling
    if need_db:
        db = ((dy.t() @ s) * scaling).to(lora_b.dtype)
    if need_da:
        xd = dropped(x, p, seed) if p > 0 else x
        da = (ds.t() @ xd).to(lora_a.dtype)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
    if need_dx:
        low = ds @ lora_a.to(dy.dtype)
        if p > 0:
            low = dropped(low, p, seed)
        amax = absmax_f32(q)
        step = row_block(q)
        via = q.dtype if q.dtype in (torch.float16, torch.bfloat16, torch.float32) else None
        acc = low.float()  # the row blocks' partial products summed in fp32, rounded once (as one GEMM would)
        for n0 in range(0, q.out_features, step):
            n1 = min(n0 + step, q.out_features)
            acc = acc + (dy[:, n0:n1] @ dequant_rows(q, amax, n0, n1, dy.dtype, via=via)).float()
        dx = acc.to(dy.dtype)
    return dx, da, db, dbias


__all__ = ["Quant4", "absmax_f32", "dequant_rows", "dequantize", "row_block", "qlora_linear_fwd_torch",
           "qlora_linear_bwd_torch", "qlora_shrink_torch", "ROW_BLOCK_ELEMENTS"]
