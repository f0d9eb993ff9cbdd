"""The adapter table of a multi-LoRA pool (ranks, offsets, scalings on the device and the host): its own module so
that the op (ops/multi_lora.py) and its measured auto choice (ops/multi_lora_auto.py) share it without importing
each other."""
from __future__ import annotations

from typing import Sequence

import torch


class AdapterTable:
    """Per-adapter metadata of a pool: ranks, offsets (pool rank rows) and scalings, on the device and on the host.

    max_rank bounds every rank and fixes the kernels' specialisation, so loading an adapter of another rank
    (<= max_rank) recompiles nothing.
    The kernels read ranks and offsets as contiguous int32 vectors (the table makes them so) and scalings as
    a float vector at any stride (a caller's tensor, not copied).
    """

    def __init__(self, ranks: Sequence[int], offsets: Sequence[int], scalings: Sequence[float] | torch.Tensor,
                 max_rank: int, device: torch.device | str):
        self.n_adapters = len(ranks)
        self.max_rank = int(max_rank)
        self.host_ranks = [int(r) for r in ranks]
        self.host_offsets = [int(o) for o in offsets]
        device = torch.device(device)
        self.ranks = torch.tensor(self.host_ranks, dtype=torch.int32).to(device)
        self.offsets = torch.tensor(self.host_offsets, dtype=torch.int32).to(device)
        if isinstance(scalings, torch.Tensor):
            self.scalings = scalings.detach().to(device=device, dtype=torch.float32)
        else:
            self.scalings = torch.tensor([float(s) for s in scalings], dtype=torch.float32).to(device)

    @classmethod
    def wrap(cls, ranks: torch.Tensor, offsets: torch.Tensor, scalings: torch.Tensor, host_ranks, host_offsets,
             max_rank: int) -> "AdapterTable":
        """A table over existing device tensors (a module's buffers): no copies unless a buffer was replaced
        by one of another layout or dtype (a module cast by .half(), say), then an explicit n-element copy."""
        t = cls.__new__(cls)
        t.n_adapters, t.max_rank = len(host_ranks), int(max_rank)
        t.host_ranks, t.host_offsets = host_ranks, host_offsets
        t.ranks = ranks.to(torch.int32).contiguous()
        t.offsets = offsets.to(torch.int32).contiguous()
        t.scalings = scalings.detach().to(torch.float32)
        return t

    @property
    def device(self) -> torch.device:
        return self.ranks.device
