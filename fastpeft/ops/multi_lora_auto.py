"""backend="auto" for the multi-adapter LoRA linear on CUDA tensors: each pass run by the backend measured fastest.

resolve_multi_lora_backend (ops/multi_lora.py) answers "measured" for auto on a CUDA device (unless
FASTPEFT_AUTOTUNE=0 or max_rank leaves torch alone); the forward and backward launch paths of ops/multi_lora.py
(the Function's and the torch.library ops') turn it into a concrete backend with `fwd_choice` / `bwd_choice`
before they group tokens or build the op's table, since both depend on the backend.

Forward and backward are chosen separately: every backend saves the same S [M, max_rank] (the same shrink:
torch's twin computes what the Triton shrink does, and cublas runs the Triton shrink) and the token grouping is
optional state: a backward that needs one and finds none (a torch forward) sorts the ids itself, and torch
ignores a grouping it is given. Key: x's and the pool's dtypes, rows bucketed, out and in features, max_rank
bucketed, bias, and the pass (forward, or backward with the gradients of x, A and B it computes).

The first call of a key times torch, triton and cublas (those that can run) on fresh tensors of the call's
shapes (ops/measured.py): a fresh pool of FRESH_ADAPTERS adapters, each of the call's max_rank, scaling 1, and
ids in FRESH_ADAPTERS contiguous equal runs of tokens (per-sequence adapters, the serving case; ids made by
arange, no RNG), grouped as the backend would group them (with the segment tiles for the backward).
"""
from __future__ import annotations

import math

import torch

from .. import autotune
from .._backend import candidates, static_default
from .measured import fresh_like, measure, needs_label
from .multi_lora_backends import _grouping, _impl
from .multi_lora_table import AdapterTable

OP = "multi_lora_linear"
FRESH_ADAPTERS = 4
_GRADS = ("dx", "dA", "dB")


def rank_reason(max_rank: int) -> str | None:
    """Why the Triton kernels (and so the cublas path's skinny kernels) cannot take this max_rank, or None."""
    from ..limits import MULTI_LORA_MAX_RANK_TRITON as limit

    return None if max_rank <= limit else f"max_rank={max_rank} exceeds the Triton kernels' maximum rank {limit}"


def multi_lora_candidates(device, max_rank: int) -> list[str]:
    """The backends timed for max_rank on `device` (tests replace this to time CPU backends)."""
    reason = rank_reason(max_rank)
    return candidates(device, triton_ok=reason, cuda_ok="multi-LoRA has no CUDA C++ kernels", cublas_ok=reason)


def _static(device, max_rank: int) -> str:
    return static_default(device, triton_ok=rank_reason(max_rank), op=OP)


def _key(x2, weight, lora_a, bias, max_rank, label):
    m, k = x2.shape
    return (x2.dtype, lora_a.dtype, f"m{autotune.m_bucket(m)}", f"n{weight.shape[0]}", f"k{k}",
            f"r{autotune.r_bucket(max_rank)}", "bias" if bias is not None else "nobias", label)


def fwd_choice(x2, weight, lora_a, lora_b, bias, table) -> str:
    """The concrete backend of the forward on 2-D x (measured on the key's first call)."""
    key = _key(x2, weight, lora_a, bias, table.max_rank, "fwd")
    name = autotune.lookup(OP, key, x2.device)  # the hot path: one dict lookup
    return name if name is not None else _measure(key, x2, weight, lora_a, lora_b, bias, table, None)


def bwd_choice(x2, weight, lora_a, lora_b, table, needs) -> str:
    """The concrete backend of the backward computing needs = (dx, dA, dB)."""
    needs = tuple(bool(n) for n in needs)
    key = _key(x2, weight, lora_a, None, table.max_rank, needs_label(_GRADS, needs))
    name = autotune.lookup(OP, key, x2.device)
    return name if name is not None else _measure(key, x2, weight, lora_a, lora_b, None, table, needs)


def fresh_pool(device, max_rank: int, m: int):
    """(AdapterTable of FRESH_ADAPTERS adapters of rank max_rank, ids [m] int32 in equal contiguous runs)."""
    n = FRESH_ADAPTERS
    table = AdapterTable([max_rank] * n, [i * max_rank for i in range(n)], [1.0] * n, max_rank, device)
    ids = torch.div(torch.arange(m, device=device, dtype=torch.int32), max(1, -(-m // n)), rounding_mode="floor")
    return table, ids


def _measure(key, x2, weight, lora_a, lora_b, bias, caller_table, needs):
    device = x2.device
    max_rank = caller_table.max_rank
    m, k = x2.shape
    n_out, r_total = weight.shape[0], FRESH_ADAPTERS * max_rank

    def fresh():
        table, ids = fresh_pool(device, max_rank, m)
        like_a = lora_a.new_empty((r_total, k))  # the pool's dtype; only the shapes differ from the caller's
        like_b = lora_b.new_empty((n_out, r_total))
        x, w, a, b, bs = fresh_like((x2, weight, like_a, like_b, bias), device,
                                    scales=(1.0, 1 / math.sqrt(k), 1 / math.sqrt(k), 1 / math.sqrt(max_rank), 1.0))
        t = (x, w, a, b, bs, ids, table)
        if needs is None:
            return t
        s = autotune.randn((m, max_rank), x2.dtype, device, autotune.generator(device, 1))
        dy = autotune.randn((m, n_out), x2.dtype, device, autotune.generator(device, 2))
        return (*t, s, dy)

    def launch(name, t):
        fwd, bwd = _impl(name)
        x, w, a, b, bs, ids, table = t[:7]
        if needs is None:
            out = x.new_empty((m, n_out))

            def run_fwd():
                grouping = _grouping(name, ids, table.n_adapters, False, True)
                return fwd(x, w, a, b, bs, ids, table, grouping, out)
            return run_fwd
        s, dy = t[7:]

        def run_bwd():
            grouping = _grouping(name, ids, table.n_adapters, True, True)
            return bwd(dy, x, w, a, b, s, ids, table, grouping, needs)
        return run_bwd

    return measure(OP, key, device, lambda: multi_lora_candidates(device, max_rank),
                   lambda: _static(device, max_rank), fresh, launch)


def measured_choice(x2, weight, lora_a, lora_b, table, bias=None, needs=None) -> str:
    """The concrete backend auto runs (or would measure and run) for the forward (needs None) or the backward
    computing needs = (dx, dA, dB). Measures on a miss."""
    if needs is None:
        return fwd_choice(x2, weight, lora_a, lora_b, bias, table)
    return bwd_choice(x2, weight, lora_a, lora_b, table, needs)


__all__ = ["fwd_choice", "bwd_choice", "measured_choice", "multi_lora_candidates", "fresh_pool", "FRESH_ADAPTERS"]
