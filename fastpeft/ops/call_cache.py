"""Validate once per layer: what a module keeps of its last validated call.

A module's forward computes a key from what its op's checks and backend choice depend on (the dtype, device and
last dimension of the input; the shape, dtype and device of every parameter; the settings) and runs the op's
checks only when the key differs from the cached one. The key never includes values, so an optimizer step costs
no check, while a parameter replaced, cast, moved or resized does. The cache is not part of the module's state:
a copy (deepcopy, pickle, torch.save) starts empty. Under torch.compile and for tensor subclasses the modules
take the op's public function, which checks every call.
"""
from __future__ import annotations

import torch

_is_compiling = torch.compiler.is_compiling


class CallCache:
    """The key of a layer's last validated call and what validating it established (`plan`)."""

    __slots__ = ("key", "plan")

    def __init__(self):
        self.key = None
        self.plan = None

    def clear(self) -> None:
        self.key = None

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):  # pickles as a fresh cache: a key refers to this process's devices
        return (type(self), ())


def cacheable(x) -> bool:
    """Whether a call on input x may use a cache: not while torch.compile traces, not for tensor subclasses."""
    return type(x) is torch.Tensor and not _is_compiling()


def tensor_key(t: torch.Tensor | None):
    """What checks see of a tensor: shape, dtype, device (None for an absent one)."""
    return None if t is None else (t.shape, t.dtype, t.device)


__all__ = ["CallCache", "cacheable", "tensor_key"]
