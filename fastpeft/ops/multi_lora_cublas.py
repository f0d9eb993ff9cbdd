"""The "cublas" backend of the multi-adapter LoRA linear: cuBLAS for the two big GEMMs, fastpeft's Triton
multi-LoRA kernels (kernels/multi_lora.py) for the rest. The launchers have the (fwd, bwd) signatures of every
multi-LoRA backend (fastpeft/ops/multi_lora.py `_impl`). No dropout (multi-LoRA has none).

Forward on x [M, K], a = ids[m] per token:
    S = x_m·A_aᵀ             [M, r_max]   Triton shrink (sorted by adapter for larger M), one read of x
    C = s_a·S_m·B_aᵀ + bias  [M, N]       _multi_lora_gemm_kernel without its K loop (HAS_BASE=False), y's dtype,
                                          written straight into y's memory
    y = C + x·W0ᵀ                         cuBLAS: C.addmm_(x, W0ᵀ), C read once in the epilogue (beta=1)
Backward:
    dS = s_a·dY_m·B_a, dB                 Triton dY and segment-reduce kernels (as the triton backend)
    low = dS_m·A_a          [M, K]        the same HAS_BASE=False kernel (L = dS, Rm = A pool, no scale)
    dX = low + dY·W0                      cuBLAS: low.addmm_(dY, W0)
    dA = dS_aᵀ·x_a                        Triton segment-reduce kernel

The low-rank term enters cuBLAS as its C input, never as a second read-modify-write pass over y. Predicted bytes
beyond the fused Triton GEMM (e = element size): the forward writes C and cuBLAS reads it back, 2·M·N·e (plus
the S and B tiles the fused epilogue reads too); the backward the same for low, 2·M·K·e. At M = 8192,
N = K = 4096, bf16: 128 MiB a pass, about 40 µs at 3.3 TB/s, against cuBLAS's GEMM of 275 GFLOP. W0 is still
read once for the whole mixed batch (one GEMM). Same S and dS as the triton backend, so their results agree
to the rounding of C (stored once in y's dtype before cuBLAS adds it).

Layouts: x, dY and W0 go to cuBLAS as they are (torch.addmm copies an operand only when neither it nor its
transpose is row-major with unit stride); the Triton kernels take every stride.
"""
from __future__ import annotations

from ..kernels.multi_lora import multi_lora_expand, multi_lora_linear_bwd, multi_lora_shrink


def multi_lora_linear_fwd_cublas(x, weight, a_pool, b_pool, bias, ids, table, grouping, out):
    """Forward on 2-D x [M, K]: writes y into out [M, N] and returns S [M, max_rank], both in x's dtype."""
    n, r_max = table.n_adapters, table.max_rank
    perm = grouping.perm if grouping is not None else None
    s = multi_lora_shrink(x, ids, perm, a_pool, table.ranks, table.offsets, n, r_max)
    multi_lora_expand(s, b_pool, bias, ids, table.scalings, table.ranks, table.offsets, n, r_max, out)  # C
    out.addmm_(x, weight.t())  # y = C + x·W0ᵀ, in C's memory
    return s


def _dx_cublas(dy, weight, a_pool, ds, ids, table):
    """dX = low + dY·W0 with low = dS_m·A_a per token written once (Rmᵀ = the A pool's transpose view)."""
    low = dy.new_empty((dy.shape[0], weight.shape[1]))
    multi_lora_expand(ds, a_pool.t(), None, ids, None, table.ranks, table.offsets, table.n_adapters,
                      table.max_rank, low)
    return low.addmm_(dy, weight)


def multi_lora_linear_bwd_cublas(dy, x, weight, a_pool, b_pool, s, ids, table, grouping, needs):
    """Backward on 2-D tensors; needs = (dx, dA, dB). Returns those three (None where not needed)."""
    return multi_lora_linear_bwd(dy, x, weight, a_pool, b_pool, s, ids, table, grouping, needs, dx_fn=_dx_cublas)


__all__ = ["multi_lora_linear_fwd_cublas", "multi_lora_linear_bwd_cublas"]
