"""Dropout of the LoRA linear's PyTorch backend: the C++ kernels of csrc/cpu/ (fastpeft._C_cpu) for CPU tensors,
else the PyTorch twin of the stream (fastpeft.dropout). The bits are the same either way; the C++ path computes
the mask on the fly (no int64 mask tensors) and is tens of times faster.

The C++ path is taken when x is a CPU tensor of fp32/fp16/bf16, the seed is a Python int, autograd does not
need a graph through the result (the kernels are not differentiable) and the extension is available
(fastpeft._ext_cpu decides once per process). Anything else (CUDA tensors, a 0-d tensor seed, float64, double
backward) goes to the twin.
"""
from __future__ import annotations

import torch

from . import _ext_cpu
from .dropout import dropout_keep_mask, keep_threshold

_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))  # not FakeTensor or other subclasses: no data to read


def twin_dropped(x: torch.Tensor, p: float, seed, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch twin, the oracle of the C++ path: where(keep, x, 0) * (1 / (1 - p)), differentiable in x."""
    if keep is None:
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) * (1.0 / (1.0 - p))


def _usable(x: torch.Tensor) -> bool:
    return (type(x) in _PLAIN and x.dtype in _DTYPES and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled()))


def dropped(x2: torch.Tensor, p: float, seed) -> torch.Tensor:
    """dropout(x2) of the stream with seed `seed`, scaled by 1 / (1 - p): a new tensor [M, K] (x2 any strides)."""
    if type(seed) is int and _usable(x2):
        ext = _ext_cpu.get()
        if ext is not None:
            return ext.dropped(x2, seed, keep_threshold(p), 1.0 / (1.0 - p))
    return twin_dropped(x2, p, seed)


def dropped_pair(x2: torch.Tensor, low: torch.Tensor, p: float, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x2), dropout(low)) under one mask, for `low` of x2's shape: one Philox pass for both.

    On the C++ path `low` is scaled in place (so pass a fresh tensor nobody else reads) and returned; on the
    twin's, a new tensor is returned. Use the returned tensors either way.
    """
    if (type(seed) is int and _usable(x2) and _usable(low) and low.dtype == x2.dtype and low.is_contiguous()
            and low.shape == x2.shape):
        ext = _ext_cpu.get()
        if ext is not None:
            return ext.dropped_pair(x2, low, seed, keep_threshold(p), 1.0 / (1.0 - p)), low
    keep = dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p, device=x2.device)
    return twin_dropped(x2, p, seed, keep), twin_dropped(low, p, seed, keep)
