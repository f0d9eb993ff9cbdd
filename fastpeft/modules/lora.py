"""LoRALinear: a frozen nn.Linear plus a LoRA adapter, with HF PEFT's names, init and scaling."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .._checks import check_finite_number, check_positive_int, check_probability
from ..ops.lora_linear_cached import LoRACallCache, lora_linear_cached  # honours torch.autocast like nn.Linear
from .merged_state import MergedState

_MISSING = object()
_MERGE_CHUNK_ELEMENTS = 1 << 20  # fp32 elements per row block of a mixed-precision merge (4 MiB)


class LoRALinear(MergedState, nn.Module):
    """Wraps an existing nn.Linear (kept as `base_layer`, frozen) with adapters `lora_A` [r, in] and `lora_B` [out, r].

    y = base_layer(x) + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ with scaling = alpha/r (alpha/√r with use_rslora),
    computed by fastpeft.lora_linear. lora_A is initialised like PEFT's default (kaiming-uniform, a=√5) and
    lora_B to zeros, so the wrapped layer starts out equal to the base layer. state_dict carries `merged`
    (see fastpeft.modules.merged_state), so a merged layer's state loads as merged.
    """

    _fastpeft_adapter = "fused"  # computes with base_layer's weight, never calls it (see fastpeft.targets)

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str | None = None, adapter_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected an nn.Linear, got {type(base_layer).__name__}")
        if base_layer.in_features < 1 or base_layer.out_features < 1:  # an empty layer has nothing to adapt
            raise ValueError(f"base_layer: expected an nn.Linear with in_features >= 1 and out_features >= 1, got "
                             f"in_features={base_layer.in_features}, out_features={base_layer.out_features}")
        self.r = check_positive_int("r", r)
        self.lora_alpha = check_finite_number("alpha", alpha)
        self.lora_dropout = check_probability("dropout", dropout)
        self.use_rslora = bool(use_rslora)
        self.backend = backend
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        w = base_layer.weight
        dtype = adapter_dtype if adapter_dtype is not None else w.dtype
        if dtype not in (w.dtype, torch.float32):
            raise TypeError(f"adapter_dtype: expected None, {w.dtype} (the base layer's dtype) or torch.float32, got {dtype}")
        self.lora_A = nn.Parameter(torch.empty(self.r, base_layer.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, self.r, device=w.device, dtype=dtype))
        self.merged = False
        self._call_cache = LoRACallCache()  # the validated signature of the last call (see lora_linear_cached)
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        # parameters straight from the registries when they are there (a module attribute lookup costs ~0.7 µs);
        # getattr when something else provides them (a parametrization, a functional_call)
        base = self._modules.get("base_layer")
        if base is None:
            base = self.base_layer
        bp, own = base._parameters, self._parameters
        w, bias = bp.get("weight"), bp.get("bias", _MISSING)
        a, b = own.get("lora_A"), own.get("lora_B")
        if w is None or bias is _MISSING or a is None or b is None:
            w, bias, a, b = base.weight, base.bias, self.lora_A, self.lora_B
        return lora_linear_cached(self._call_cache, x, w, a, b, self.scaling, bias, self.lora_dropout, self.training,
                                  self.backend)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += scaling·B·A in place, no [out, in] temporary (fp32 adapters over a 16-bit W0: in row blocks);
        forward is then the plain linear."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing to do", stacklevel=2)
            return
        self._add_delta(self.scaling)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W0 -= scaling·B·A (exact up to the rounding of W0's dtype)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing to do", stacklevel=2)
            return
        self._add_delta(-self.scaling)
        self.merged = False

    def _add_delta(self, coeff: float) -> None:
        w, a, b = self.base_layer.weight, self.lora_A, self.lora_B
        if w.dtype == a.dtype:
            w.addmm_(b, a, alpha=coeff)  # the GEMM accumulates straight into W0
            return
        # fp32 adapters over a 16-bit W0: accumulate in fp32 and round into W0 once per element, a block of rows
        # at a time so that the fp32 temporary stays far below W0's size
        rows = max(1, min((w.shape[0] + 1) // 2, _MERGE_CHUNK_ELEMENTS // max(1, w.shape[1])))
        for i in range(0, w.shape[0], rows):
            block = w[i:i + rows]
            acc = block.float()
            acc.addmm_(b[i:i + rows], a, alpha=coeff)
            block.copy_(acc)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha:g}, dropout={self.lora_dropout:g}, scaling={self.scaling:g}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
