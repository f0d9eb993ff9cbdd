"""Memory of one evaluation: peak allocated bytes (CUDA) and the tensors autograd saves for backward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensors:
    """Counts what autograd saves for backward while active (torch.autograd.graph.saved_tensors_hooks).

    Each distinct storage is counted once, at its full size (a saved slice keeps its whole storage alive).
    Storages of `inputs` (x, the weights, the adapters) are listed separately: `beyond_inputs_bytes` is the
    activation memory a layer adds by being trained. Tensors an autograd.Function keeps as ctx attributes
    instead of save_for_backward are invisible to the hooks.
    """

    def __init__(self, inputs: Iterable[torch.Tensor] = ()):
        self._input_keys = {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
        self._seen: dict[tuple, dict] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._seen:
            self._seen[key] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                               "bytes": int(t.untyped_storage().nbytes()), "input": key in self._input_keys}
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def entries(self) -> list[dict]:
        return list(self._seen.values())

    @property
    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self._seen.values())

    @property
    def beyond_inputs(self) -> list[dict]:
        return [e for e in self._seen.values() if not e["input"]]

    @property
    def beyond_inputs_bytes(self) -> int:
        return sum(e["bytes"] for e in self.beyond_inputs)


def reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


@dataclass
class Footprint:
    """One evaluation: what it returned, its peak memory beyond what was allocated before, saved tensors."""

    output: object
    peak_bytes: int | None  # None where the device has no allocator statistics (CPU)
    saved: SavedTensors


def measure(run: Callable[[], object], device: torch.device, inputs: Iterable[torch.Tensor] = ()) -> Footprint:
    """Call run() once, recording the peak allocated memory (relative to what was allocated before: inputs,
    weights and the caller's buffers are excluded) and what autograd saves while it runs."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    saved = SavedTensors(inputs)
    with saved:
        out = run()
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device) - base)
    return Footprint(out, peak, saved)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a case's tensors on `device` (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


__all__ = ["SavedTensors", "Footprint", "measure", "reset_grads", "free_bytes"]
