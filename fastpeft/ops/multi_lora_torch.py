"""The PyTorch backend of the multi-adapter LoRA linear: the kernels' math in plain torch ops (the CPU path).

Same pool layout, same saved tensors (x, S [M, max_rank]) and the same results as kernels/multi_lora.py.
One small matmul per adapter present in the batch: finding which adapters are present reads the ids on the
host (a device sync on CUDA), which the Triton backend never does.
"""
from __future__ import annotations

import torch


def _groups(ids: torch.Tensor, n_adapters: int, ranks: tuple):
    """(adapter, token rows) for every adapter of non-zero rank that has tokens, in adapter order."""
    wide = ids.long()  # any id dtype: a uint8 key could not hold -1 (and would sort invalid ids last)
    valid = (wide >= 0) & (wide < n_adapters)
    key = torch.where(valid, wide, -1)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key[valid].long(), minlength=n_adapters).tolist()
    start = int((~valid).sum())
    out = []
    for a, c in enumerate(counts):
        if c and ranks[a] > 0:
            out.append((a, order[start:start + c]))
        start += c
    return out


def multi_lora_linear_fwd_torch(x, weight, a_pool, b_pool, bias, ids, table, grouping, out):
    """Forward on 2-D x [M, K]: writes y into out [M, N] and returns S [M, max_rank], both in x's dtype."""
    if bias is None:
        y = torch.mm(x, weight.t(), out=out)
    else:
        y = torch.addmm(bias, x, weight.t(), out=out)
    s = x.new_zeros((x.shape[0], table.max_rank))
    for a, rows in _groups(ids, table.n_adapters, table.host_ranks):
        r, o = table.host_ranks[a], table.host_offsets[a]
        s_a = x[rows] @ a_pool[o:o + r].to(x.dtype).t()
        s[rows, :r] = s_a
        low = (s_a * table.scalings[a].to(x.dtype)) @ b_pool[:, o:o + r].to(x.dtype).t()
        y[rows] += low
    return s


def multi_lora_linear_bwd_torch(dy, x, weight, a_pool, b_pool, s, ids, table, grouping, needs):
    """Backward on 2-D tensors; needs = (dx, dA, dB). Returns those three (None where not needed)."""
    need_dx, need_da, need_db = needs
    dx = dy @ weight if need_dx else None
    da = torch.zeros_like(a_pool) if need_da else None
    db = torch.zeros_like(b_pool) if need_db else None
    for a, rows in _groups(ids, table.n_adapters, table.host_ranks):
        r, o = table.host_ranks[a], table.host_offsets[a]
        sc = table.scalings[a].to(torch.float32)
        dy_a = dy[rows]
        if need_db:
            db[:, o:o + r] = ((dy_a.t() @ s[rows, :r]).float() * sc).to(b_pool.dtype)
        if need_dx or need_da:
            ds_a = (dy_a @ b_pool[:, o:o + r].to(dy.dtype)).float() * sc
            if need_dx:
                dx[rows] += (ds_a @ a_pool[o:o + r].float()).to(dx.dtype)
            if need_da:
                da[o:o + r] = (ds_a.t() @ x[rows].float()).to(a_pool.dtype)
    return dx, da, db
