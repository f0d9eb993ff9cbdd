"""The IA3 linear's concrete backends: name -> (fwd, bwd) launchers. Imported by ops/ia3.py (which adds "measured")
and by its measured auto choice (ops/ia3_auto.py), which imports nothing of ops/ia3.py itself."""
from __future__ import annotations

from .ia3_torch import ia3_bwd_torch, ia3_fwd_torch


def launchers(backend: str):
    """(fwd, bwd) of "torch", "triton" or "cublas"."""
    if backend == "triton":
        from ..kernels import ia3 as k

        return k.ia3_fwd, k.ia3_bwd
    if backend == "cublas":
        from .ia3_cublas import ia3_bwd_cublas, ia3_fwd_cublas

        return ia3_fwd_cublas, ia3_bwd_cublas
    return ia3_fwd_torch, ia3_bwd_torch
