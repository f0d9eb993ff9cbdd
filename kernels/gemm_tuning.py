"""Measured tile configs for the Triton GEMMs: one mechanism for the LoRA GEMM (kernels/lora_gemm_tuning.py), the
IA3 GEMM (kernels/ia3.py) and the multi-LoRA GEMM (kernels/multi_lora.py).

A launcher on CUDA tensors (`tunable`) asks `tuned_config(op, key, device, candidates, tensors, launch)`: the
first call for a key times every candidate config through fastpeft/autotune.py `choose` (launch(t, cfg) on
fresh tensors t = tensors(generator), made once per key and dropped right after, never the caller's) and keeps
the fastest; later calls find it with one dict lookup (autotune.lookup). When nothing may be measured
(FASTPEFT_AUTOTUNE=0, torch.compile tracing, CUDA graph capture, the tuning cap) autotune gives the cached
decision or DEFAULT_CANDIDATE, the static table's entry. Under the interpreter and on the CPU the launchers use
their interpreter config and never get here. Tests replace `tunable` (per launcher module) and inject timings.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import autotune
from .common import interpreting, tiles_for

DEFAULT_CANDIDATE = "default"


def tunable(device: torch.device) -> bool:
    """Whether a GEMM's config is chosen by measurement (CUDA tensors, compiled kernels)."""
    return device.type == "cuda" and not interpreting()


def resolve_candidates(cands: dict, dtype: torch.dtype, precision: str) -> dict:
    """A size's candidate set ({name: table entry}) resolved for operands of `dtype` at `precision`
    (common.tiles_for). fp32 keeps DEFAULT_CANDIDATE alone: the static tests compile the others for 16-bit
    operands only."""
    if dtype == torch.float32:
        return {DEFAULT_CANDIDATE: tiles_for(cands[DEFAULT_CANDIDATE], dtype, precision)}
    return {name: tiles_for(cfg, dtype, precision) for name, cfg in cands.items()}


def fresh_like(t: torch.Tensor | None, g: torch.Generator) -> torch.Tensor | None:
    """A stand-in for t in a timing run: random values in t's memory order for floating t, a copy for integer t
    (adapter ids, ranks, offsets: their values set the work, so they are kept), None for None."""
    if t is None:
        return None
    return autotune.randn_like(t, g) if t.is_floating_point() else t.clone()


def tuned_config(op: str, key: tuple, device: torch.device, candidates: dict,
                 tensors: Callable[[torch.Generator], tuple], launch: Callable[[tuple, dict], object]) -> dict:
    """The config of `candidates` ({name: config}, DEFAULT_CANDIDATE among them) that `op` launches with at
    `key` on `device` (see the module docstring)."""
    name = autotune.lookup(op, key, device)
    if name is None:
        holder = {}

        def runner(cand):
            if "t" not in holder:
                holder["t"] = tensors(autotune.generator(device))
            t, cfg = holder["t"], candidates[cand]
            return autotune.Run(cand, lambda: launch(t, cfg))

        try:
            name = autotune.choose(op, key, device, lambda: list(candidates), runner, lambda: DEFAULT_CANDIDATE)
        finally:
            holder.clear()  # the fresh tensors go now, not with the closures
    return candidates[name]


def chosen_configs(op: str) -> list[dict]:
    """The decisions of `op` in this process (for benchmarks): backend_report()["autotune"]'s records (key, the
    chosen candidate's name as "backend", per-candidate milliseconds, source, and its tiles as "detail" where the
    op registered a describer with autotune.set_describer)."""
    return [rec for rec in autotune.report()["decisions"] if rec["op"] == op]


__all__ = ["DEFAULT_CANDIDATE", "tunable", "resolve_candidates", "fresh_like", "tuned_config", "chosen_configs"]
