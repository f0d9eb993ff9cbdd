"""fastpeft.IA3Linear: a frozen nn.Linear with a learned IA3 vector folded into its GEMM."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.ia3 import SCALE_MODES, ia3_linear


class IA3Linear(nn.Module):
    """IA3 (Liu et al. 2022) on a frozen linear: scale="output" scales the output (k, v projections, bias
    included, as PEFT does), scale="input" the input (feed-forward). The vector starts at ones, so the layer
    starts equal to the linear. merge() folds it into the linear's weight (and bias); unmerge() undoes that.
    """

    def __init__(self, linear: nn.Linear, scale: str = "output", *, dtype=None, backend=None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        if not isinstance(scale, str) or scale not in SCALE_MODES:
            raise ValueError(f"scale: expected one of {SCALE_MODES}, got {scale!r}")
        self.base_layer = linear
        self.scale_mode = scale
        self.backend = backend
        for p in linear.parameters():
            p.requires_grad_(False)
        n = linear.out_features if scale == "output" else linear.in_features
        self.ia3_scale = nn.Parameter(torch.ones(n, device=linear.weight.device, dtype=dtype or linear.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return ia3_linear(x, self.base_layer.weight, self.base_layer.bias, self.ia3_scale, self.scale_mode,
                          backend=self.backend)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the vector into the linear (W ← diag(l)·W, b ← l ⊙ b for output scaling; W ← W·diag(l) for
        input scaling). Computed in fp32, rounded once to the weight's dtype."""
        if self.merged:
            raise RuntimeError("IA3Linear.merge: already merged")
        w, b, l = self.base_layer.weight, self.base_layer.bias, self.ia3_scale.float()
        if self.scale_mode == "output":
            w.copy_(w.float() * l[:, None])
            if b is not None:
                b.copy_(b.float() * l)
        else:
            w.copy_(w.float() * l[None, :])
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() by dividing by the vector (exact up to one rounding of the weight's dtype).
        Raises if an entry of the vector is 0, where the original weights cannot be recovered."""
        if not self.merged:
            raise RuntimeError("IA3Linear.unmerge: not merged")
        l = self.ia3_scale.float()
        if bool((l == 0).any()):
            raise ValueError("ia3_scale: cannot unmerge, an entry is exactly 0 so the merged weights lost the original")
        w, b = self.base_layer.weight, self.base_layer.bias
        if self.scale_mode == "output":
            w.copy_(w.float() / l[:, None])
            if b is not None:
                b.copy_(b.float() / l)
        else:
            w.copy_(w.float() / l[None, :])
        self.merged = False

    def extra_repr(self) -> str:
        return f"scale={self.scale_mode!r}, merged={self.merged}"


__all__ = ["IA3Linear"]
