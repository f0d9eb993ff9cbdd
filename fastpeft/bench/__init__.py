"""Benchmarks of every fastpeft op against the baselines users would pick instead, with one harness.

    python -m fastpeft.bench {lora,adapter,ia3,galore,multi-lora,dora,qlora,all} [--preset quick|full|cpu|smoke]

Modules: presets (timing and presets), timing, memory (peak, saved tensors), ceilings (measured GEMM and
copy rates), tolerances (the one tolerance table), opspec (what an op module defines, and the defaults),
common and core (implementations, check, run loop), schema (JSON and metadata), report (tables, markdown,
plot), suite (pytest-benchmark), and one module per op giving its cases, inputs, float64 reference,
implementations and FLOP/byte counts: lora, adapter, ia3, galore, multi_lora, dora, qlora.
"""
from __future__ import annotations

import importlib

OPS = {"lora": "lora", "adapter": "adapter", "ia3": "ia3", "galore": "galore", "multi-lora": "multi_lora",
       "dora": "dora", "qlora": "qlora"}


def get_op(name: str):
    """An op by its CLI name (lora, adapter, ia3, galore, multi-lora, dora, qlora): its module, with opspec's defaults."""
    if name not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {name!r}")
    from .opspec import OpSpec

    return OpSpec(importlib.import_module(f"{__name__}.{OPS[name]}"))


__all__ = ["OPS", "get_op"]
