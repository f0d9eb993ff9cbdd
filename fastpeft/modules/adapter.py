"""fastpeft.BottleneckAdapter: h + s·up(act(down(LN?(h)))) as one fused op, initialised to the identity."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_finite_number, check_positive_int
from ..ops.adapter import ACTIVATIONS, bottleneck_adapter_cached
from ..ops.call_cache import CallCache


class BottleneckAdapter(nn.Module):
    """Bottleneck adapter (Houlsby / Pfeiffer series, He et al. parallel) with fused kernels.

    forward(h) = h + scaling·(act(down(n(h)))·up): a series adapter on a sub-layer's output h.
    forward(x, residual) = residual + scaling·(...)(x): a parallel adapter on a sub-layer's input x, added
    to its output `residual`. n is a LayerNorm over d_model when layer_norm=True (AdapterHub's
    ln_before), else the identity; the skip path always carries the un-normalised input.
    The up-projection starts at zero, so a new adapter is the identity (the base model's function).
    """

    _fastpeft_adapter = "adapter"  # an adapter layer: nothing is injected inside it (see fastpeft.targets)

    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu", scaling: float = 1.0,
                 layer_norm: bool = False, bias: bool = True, *, device=None, dtype=None, backend=None):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.bottleneck = check_positive_int("bottleneck", bottleneck)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.scaling = check_finite_number("scaling", scaling)
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(d_model, **kw) if layer_norm else None
        self.down_weight = nn.Parameter(torch.empty(bottleneck, d_model, **kw))
        self.up_weight = nn.Parameter(torch.empty(d_model, bottleneck, **kw))
        self.down_bias = nn.Parameter(torch.empty(bottleneck, **kw)) if bias else None
        self.up_bias = nn.Parameter(torch.empty(d_model, **kw)) if bias else None
        self._call_cache = CallCache()  # the validated signature of the last call (fastpeft/ops/call_cache.py)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # down as nn.Linear initialises its weight; everything after it zero, so the adapter starts as identity
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_weight)
        for b in (self.down_bias, self.up_bias):
            if b is not None:
                nn.init.zeros_(b)
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = h
        if self.norm is not None:
            x = self.norm(h)
            if residual is None:
                residual = h
        return bottleneck_adapter_cached(self._call_cache, x, self.down_weight, self.down_bias, self.up_weight,
                                         self.up_bias, self.scaling, self.activation, residual=residual,
                                         backend=self.backend)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={self.scaling}, layer_norm={self.norm is not None}, bias={self.down_bias is not None}")


__all__ = ["BottleneckAdapter"]
