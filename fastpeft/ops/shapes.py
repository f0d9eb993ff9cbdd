"""Shape helpers shared by every op: activations [..., d] are handled as 2-D rows [M, d]."""
from __future__ import annotations

import torch


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., d] as [M, d]: a view whenever the leading dims can be merged (the kernels take any 2-D strides,
    stride 0 included); a copy only for leading dims that no single stride spans, e.g. a permuted [S, B, d]."""
    return t.reshape(-1, t.shape[-1])


def lead_rows(t: torch.Tensor):
    """M, the product of t's leading dims; symbolic sizes stay symbolic (fake implementations use this)."""
    m = 1
    for d in t.shape[:-1]:
        m = m * d
    return m


__all__ = ["as_rows", "lead_rows"]
