"""torch.autocast for the fused LoRA linear: compute in the dtype nn.Linear would compute in.

Under autocast, nn.Linear casts its input, weight and bias to the autocast dtype of their device (bf16 or fp16)
and returns that dtype. fastpeft.lora_linear needs x, weight and bias in one dtype, and its kernels would
ignore autocast, so the layer casts first, exactly as nn.Linear would, and then runs with autocast off so
that nothing inside is cast a second time (the backward then sees the same dtypes as the forward).
Adapters in fp32 stay fp32 (the kernels take fp32 adapters with 16-bit activations and return their
gradients in fp32); adapters in another 16-bit dtype are cast like the weight.
"""
from __future__ import annotations

import torch

from .ops.lora_linear import lora_linear

_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast never touches float64


def _get_autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype nn.Linear would compute in on `device` right now, or None when autocast is off there."""
    kind = device.type
    if kind not in ("cuda", "cpu", "xpu", "mps", "hpu"):
        return None
    if not torch.is_autocast_enabled(kind):
        return None
    return _get_autocast_dtype(kind)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or t.dtype == dtype or t.dtype not in _ELIGIBLE:
        return t
    return t.to(dtype)


def lora_linear_amp(x, weight, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, training=True, *, seed=None,
                    backend=None, dropout_mask="regenerate"):
    """fastpeft.lora_linear that honours torch.autocast the way nn.Linear does (same arguments).

    Outside autocast this is fastpeft.lora_linear itself. Inside, x, weight and bias are cast to the autocast
    dtype (a differentiable cast: x's gradient comes back in x's own dtype), adapters to it unless they are fp32.
    """
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return lora_linear(x, weight, lora_a, lora_b, scaling, bias=bias, dropout_p=dropout_p, training=training,
                           seed=seed, backend=backend, dropout_mask=dropout_mask)
    x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    if lora_a.dtype != torch.float32 or lora_b.dtype != torch.float32:
        lora_a, lora_b = _cast(lora_a, dtype), _cast(lora_b, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return lora_linear(x, weight, lora_a, lora_b, scaling, bias=bias, dropout_p=dropout_p, training=training,
                           seed=seed, backend=backend, dropout_mask=dropout_mask)


__all__ = ["lora_linear_amp", "autocast_dtype"]
