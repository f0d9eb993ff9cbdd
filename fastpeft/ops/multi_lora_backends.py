"""The multi-LoRA linear's concrete backends: name -> (fwd, bwd) launchers, and the token grouping each wants.
Imported by ops/multi_lora.py and by the measured auto choice (ops/multi_lora_auto.py), which imports nothing of
ops/multi_lora.py itself."""
from __future__ import annotations

import torch

from .multi_lora_torch import multi_lora_linear_bwd_torch, multi_lora_linear_fwd_torch


def _impl(backend: str):
    if backend == "triton":
        from ..kernels import multi_lora as k

        return k.multi_lora_linear_fwd, k.multi_lora_linear_bwd
    if backend == "cublas":
        from .multi_lora_cublas import multi_lora_linear_bwd_cublas, multi_lora_linear_fwd_cublas

        return multi_lora_linear_fwd_cublas, multi_lora_linear_bwd_cublas
    return multi_lora_linear_fwd_torch, multi_lora_linear_bwd_torch


def _grouping(backend: str, ids: torch.Tensor, n_adapters: int, need_tiles: bool, grouped: bool):
    """Sort tokens by adapter when it pays (larger M) or the backward needs per-adapter segments."""
    if backend not in ("triton", "cublas"):  # the cublas backend runs the same Triton shrink and backward kernels
        return None
    from ..kernels import multi_lora as k

    if not need_tiles and (ids.numel() <= k.DECODE_M or grouped):
        return None
    return k.Grouping(ids, n_adapters, k.seg_block_m(), with_tiles=need_tiles)
