"""The LoRA linear's concrete backends: name -> (fwd, bwd) launchers, imported on first use and kept.

Every pair has the same signatures: fwd(x2, weight, lora_a, lora_b, bias, scaling, p, seed, thr) -> (y, S) and
bwd(dy, x2, weight, lora_a, lora_b, S, scaling, p, seed, thr, needs) -> (dx, dA, dB, dbias). ops/lora_linear.py
adds "measured" (ops/lora_linear_auto.py, which picks among these by shape).
"""
from __future__ import annotations

from .lora_linear_torch import lora_linear_bwd_torch, lora_linear_fwd_torch

_TABLE: dict = {"torch": (lora_linear_fwd_torch, lora_linear_bwd_torch)}


def launchers(name: str):
    """(fwd, bwd) of backend `name`: "torch", "triton", "cublas" or "cuda"."""
    pair = _TABLE.get(name)
    if pair is not None:
        return pair
    if name == "triton":
        from ..kernels.lora_linear import lora_linear_bwd, lora_linear_fwd

        pair = (lora_linear_fwd, lora_linear_bwd)
    elif name == "cublas":
        from .lora_linear_cublas import lora_linear_bwd_cublas, lora_linear_fwd_cublas

        pair = (lora_linear_fwd_cublas, lora_linear_bwd_cublas)
    elif name == "cuda":
        from .lora_linear_cuda import lora_linear_bwd_cuda, lora_linear_fwd_cuda

        pair = (lora_linear_fwd_cuda, lora_linear_bwd_cuda)
    else:
        raise ValueError(f"backend: expected torch, triton, cublas or cuda, got {name!r}")
    _TABLE[name] = pair
    return pair


__all__ = ["launchers"]
