"""fastpeft.IA3Linear: a frozen nn.Linear with a learned IA3 vector folded into its GEMM."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.call_cache import CallCache
from ..ops.ia3 import SCALE_MODES, ia3_linear_cached
from .merged_state import MergedState


def _lost(old: torch.Tensor, new: torch.Tensor, tiny: float) -> bool:
    """Whether a weight in the normal range was flushed to 0, or a finite one overflowed. (Weights already below
    the normal range may flush: they lose less than the dtype's smallest normal number.)"""
    return bool(((new == 0) & (old.abs() >= tiny)).any() | (~torch.isfinite(new) & torch.isfinite(old)).any())


class IA3Linear(MergedState, nn.Module):
    """IA3 (Liu et al. 2022) on a frozen linear: scale="output" scales the output (k, v projections, bias
    included, as PEFT does), scale="input" the input (feed-forward). The vector starts at ones, so the layer
    starts equal to the linear. merge() folds it into the linear's weight (and bias); unmerge() undoes that.
    state_dict carries `merged` and `merge_lossy` (see fastpeft.modules.merged_state).
    """

    _fastpeft_adapter = "fused"  # computes with base_layer's weight, never calls it (see fastpeft.targets)
    _merge_flags = ("merged", "merge_lossy")

    def __init__(self, linear: nn.Linear, scale: str = "output", *, dtype=None, backend=None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        if linear.in_features < 1 or linear.out_features < 1:
            raise ValueError(f"linear: expected in_features >= 1 and out_features >= 1, got {linear}")
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
        self.merge_lossy = False  # merge() flushed or overflowed some weights: unmerge() cannot restore them
        self._call_cache = CallCache()  # the validated signature of the last call (fastpeft/ops/call_cache.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        return ia3_linear_cached(self._call_cache, x, base.weight, base.bias, self.ia3_scale, self.scale_mode,
                                 self.backend)

    def _check_scale(self, op: str, allow_zero: bool) -> torch.Tensor:
        """The vector in fp32, after checking (before any weight changes) that every entry can be applied."""
        l = self.ia3_scale.detach().float()
        bad = ~torch.isfinite(l) if allow_zero else ~torch.isfinite(l) | (l == 0)
        if bool(bad.any()):  # a host sync; merge/unmerge are not on a hot path
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"ia3_scale: cannot {op}: entry {i} is {l[i].item()} ({int(bad.sum())} such entries); "
                             f"{'merging' if op == 'merge' else 'unmerging'} needs finite"
                             f"{'' if allow_zero else ', non-zero'} entries; the weights are unchanged")
        return l

    def _scale_weights(self, l: torch.Tensor, divide: bool) -> bool:
        """W ← W·diag(l) (input) or diag(l)·W and b ← l ⊙ b (output), or the same divided by l, in place and in
        row blocks: each block is computed in fp32 and rounded once to W's dtype, and no temporary as large as
        W exists. Returns whether information was lost (see _lost)."""
        w, b = self.base_layer.weight, self.base_layer.bias
        out_f, in_f = w.shape
        # at most half of W (so never a W-sized temporary, whatever the shape) and at most 4M elements
        rows = max(1, min(-(-out_f // 2), (1 << 22) // in_f))
        cols = in_f if out_f > 1 else max(1, -(-in_f // 2))
        tiny = torch.finfo(w.dtype).tiny
        lossy = False
        for r0 in range(0, out_f, rows):
            for c0 in range(0, in_f, cols):
                blk = w[r0:r0 + rows, c0:c0 + cols]
                f = l[r0:r0 + rows, None] if self.scale_mode == "output" else l[None, c0:c0 + cols]
                new = blk.to(torch.float32, copy=True)  # a copy even for fp32: `blk` is compared with it below
                new = (new.div_(f) if divide else new.mul_(f)).to(w.dtype)
                lossy |= _lost(blk, new, tiny)
                blk.copy_(new)
        if b is not None and self.scale_mode == "output":
            new = b.to(torch.float32, copy=True)
            new = (new.div_(l) if divide else new.mul_(l)).to(b.dtype)
            lossy |= _lost(b, new, tiny)
            b.copy_(new)
        return lossy

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the vector into the linear (W ← diag(l)·W, b ← l ⊙ b for output scaling; W ← W·diag(l) for
        input scaling). Computed in fp32 in row blocks, rounded once to the weight's dtype. Raises, before
        changing anything, if an entry is not finite."""
        if self.merged:
            raise RuntimeError("IA3Linear.merge: already merged")
        l = self._check_scale("merge", allow_zero=True)
        self.merge_lossy = self._scale_weights(l, divide=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() by dividing by the vector (exact up to one rounding of the weight's dtype). Raises,
        before changing anything, if an entry is 0 or not finite, or if merge() flushed weights to 0 (a tiny
        entry under 16-bit weights) or overflowed them: the original weights are lost then."""
        if not self.merged:
            raise RuntimeError("IA3Linear.unmerge: not merged")
        l = self._check_scale("unmerge", allow_zero=False)
        if self.merge_lossy:
            raise ValueError("ia3_scale: cannot unmerge: merging flushed some nonzero weights to 0 (or overflowed "
                             f"them) in {self.base_layer.weight.dtype}, so the original weights are lost; reload them")
        self._scale_weights(l, divide=True)
        self.merged = False

    def extra_repr(self) -> str:
        return f"scale={self.scale_mode!r}, merged={self.merged}"


__all__ = ["IA3Linear"]
