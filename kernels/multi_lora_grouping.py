"""Tokens of a multi-adapter batch grouped by adapter, for the kernels of kernels/multi_lora.py."""
from __future__ import annotations

import torch
import triton


class Grouping:
    """Tokens sorted by adapter on the device (no host sync, CUDA-graph safe: every size is host-known).

    perm [M] int64: position -> token row, ids stably sorted (base-only tokens first).
    tiles [3, n_tiles] int32: per segment tile (adapter, first position, end position), adapter -1 past the
        real tiles; n_tiles = cdiv(M, block) + min(M, n_adapters) bounds the real count.
    tile_cum [n_adapters + 1] int32: adapter a's tiles are tile_cum[a] .. tile_cum[a+1].
    """

    def __init__(self, ids: torch.Tensor, n_adapters: int, block: int, with_tiles: bool):
        M = ids.numel()
        wide = ids.long()  # any id dtype and stride; a uint8 key could not hold -1
        key = torch.where((wide >= 0) & (wide < n_adapters), wide, -1)
        _, self.perm = torch.sort(key, stable=True)
        self.block = block
        self.tiles = self.tile_cum = None
        self.n_tiles = 0
        if not with_tiles:
            return
        dev = ids.device
        counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=dev)
        counts.scatter_add_(0, key.long() + 1, torch.ones(M, dtype=torch.int64, device=dev))
        seg_end = counts.cumsum(0)
        start, count = (seg_end - counts)[1:], counts[1:]
        tile_incl = ((count + block - 1) // block).cumsum(0)
        self.tile_cum = torch.cat([tile_incl.new_zeros(1), tile_incl]).to(torch.int32)
        self.n_tiles = n_tiles = triton.cdiv(M, block) + min(M, n_adapters)
        p = torch.arange(n_tiles, dtype=torch.int64, device=dev)
        adapter = torch.searchsorted(tile_incl, p, right=True)  # n_adapters past the last real tile
        ac = adapter.clamp(max=n_adapters - 1)
        first = start[ac] + (p - (tile_incl[ac] - (count[ac] + block - 1) // block)) * block
        end = torch.minimum(first + block, start[ac] + count[ac])
        real = adapter < n_adapters
        zero = torch.zeros_like(first)
        self.tiles = torch.stack([torch.where(real, adapter, -1), torch.where(real, first, zero),
                                  torch.where(real, end, zero)]).to(torch.int32)
