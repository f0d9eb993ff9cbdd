"""What the measuring dispatchers of backend="auto" share (ops/lora_linear_auto.py, ia3_auto.py, multi_lora_auto.py).

Each op keys a pass (forward, or backward with the gradients it computes) by its shapes and dtypes, looks the
key up (fastpeft.autotune.lookup: one dict lookup) and launches the backend found. On a miss `measure` times
every candidate through fastpeft.autotune.choose on fresh tensors of the call's shapes (`fresh`: drawn from autotune's private
generators, never the caller's tensors or torch's RNG), built once per measurement and dropped after it.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import autotune

_LABELS: dict = {}


def needs_label(names: tuple, needs: tuple) -> str:
    """"bwd:" and the names of the gradients computed ("bwd:dx+dA"; "bwd:none"), cached: a hot-path key part."""
    label = _LABELS.get((names, needs))
    if label is None:
        label = _LABELS[(names, needs)] = "bwd:" + ("+".join(n for n, f in zip(names, needs) if f) or "none")
    return label


def measure(op: str, key: tuple, device: torch.device, candidates: Callable[[], list],
            static: Callable[[], str], fresh: Callable[[], tuple],
            launch: Callable[[str, tuple], Callable[[], object]]) -> str:
    """autotune.choose with runners on fresh tensors: fresh() builds them (once, on the first runner asked for,
    so a decision found on disk builds nothing); launch(name, tensors) returns the function that runs the pass
    once with backend `name` on them."""
    holder = {}

    def runner(name):
        if "t" not in holder:
            holder["t"] = fresh()
        return autotune.Run(name, launch(name, holder["t"]))

    try:
        return autotune.choose(op, key, device, candidates, runner, static)
    finally:
        holder.clear()  # the fresh tensors go now, not with the closures


def fresh_like(tensors, device: torch.device, seed: int = 0, scales=None) -> tuple:
    """Fresh tensors of each tensor's shape, dtype and memory order (None stays None), from autotune's private
    generator `seed`; scales: per tensor, the values' standard deviation (default 1)."""
    g = autotune.generator(device, seed)
    scales = scales or (1.0,) * len(tensors)
    return tuple(None if t is None else autotune.randn_like(t, g, s) for t, s in zip(tensors, scales))


__all__ = ["needs_label", "measure", "fresh_like"]
