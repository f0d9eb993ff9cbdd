"""Memory claims as tests: record every tensor an op allocates, and every tensor autograd saves.

    with AllocRecorder() as rec:
        y = layer(x); y.sum().backward()
    rec.assert_below(out_f * in_f, "LoRA forward+backward")   # no tensor of out·in elements or more

    with SavedRecorder() as saved:
        y = layer(x)
    saved.assert_none_shaped_like(x, allow=[x])              # nothing [M, in]-sized but x itself

AllocRecorder is a TorchDispatchMode: it sees each ATen op's outputs on any device (the CPU included) and
records those that own new storage (views and in-place results, which alias an input, are not allocations).
Triton kernels under the interpreter allocate through torch too (torch.empty in the launchers), so their
buffers are seen as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Allocation:
    op: str
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta / fake tensors have no data
        return None


class AllocRecorder(TorchDispatchMode):
    """Records every tensor created by an ATen op inside the `with` block that owns fresh storage."""

    def __init__(self):
        super().__init__()
        self.allocations: list[Allocation] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is not None and key not in inputs and t.untyped_storage().nbytes() > 0:
                    self.allocations.append(Allocation(str(func), tuple(t.shape), t.dtype))
        return out

    def largest(self) -> Allocation | None:
        return max(self.allocations, key=lambda a: a.numel, default=None)

    def assert_below(self, limit: int, what: str) -> None:
        """No single allocation of `limit` elements or more."""
        big = [a for a in self.allocations if a.numel >= limit]
        assert not big, (f"{what}: {len(big)} allocation(s) of >= {limit} elements, e.g. "
                          + "; ".join(f"{a.op} {list(a.shape)} {a.dtype}" for a in big[:5]))


class SavedRecorder(torch.autograd.graph.saved_tensors_hooks):
    """Records every tensor autograd saves for backward (custom Functions' save_for_backward included)."""

    def __init__(self):
        self.saved: list[torch.Tensor] = []

        def pack(t):
            self.saved.append(t)
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self

    def assert_none_shaped_like(self, shape, allow=(), what: str = "") -> None:
        """Nothing with at least prod(shape) elements is saved, except the tensors in `allow` (or views of
        their storage: saving x itself, or a reshaped view of it, costs no memory)."""
        limit = 1
        for d in shape:
            limit *= d
        allowed = {_storage_key(t) for t in allow}
        big = [t for t in self.saved if t.numel() >= limit and _storage_key(t) not in allowed]
        assert not big, f"{what}: saved for backward: " + "; ".join(f"{list(t.shape)} {t.dtype}" for t in big)
