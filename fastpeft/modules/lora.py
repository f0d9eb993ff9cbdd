"""LoRALinear: a frozen nn.Linear plus a LoRA adapter, with HF PEFT's names, init and scaling.

LoRALinear(..., use_dora=True) makes a DoRALinear (a LoRALinear subclass): PEFT's DoRA, with the magnitude vector
`lora_magnitude_vector` [out] as PEFT names it, computed by fastpeft.dora_linear."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .._checks import FLOAT_DTYPES, check_finite_number, check_positive_int, check_probability
from ..dropout import check_dropout_mask
from ..ops.dora_linear_cached import DoRACallCache, cached_weight_sq_norm, dora_linear_cached
from ..ops.dora_linear_torch import dora_norm
from ..ops.lora_linear_cached import LoRACallCache, lora_linear_cached  # honours torch.autocast like nn.Linear
from ..ops.qlora_linear_cached import QLoRACallCache, compute_dtype, qlora_linear_cached
from ..targets import is_linear4bit
from .merged_state import MergedState

_MISSING = object()
_MERGE_CHUNK_ELEMENTS = 1 << 20  # fp32 elements per row block of a mixed-precision merge (4 MiB)


class LoRALinear(MergedState, nn.Module):
    """Wraps an existing nn.Linear (kept as `base_layer`, frozen) with adapters `lora_A` [r, in] and `lora_B` [out, r].

    y = base_layer(x) + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ with scaling = alpha/r (alpha/√r with use_rslora),
    computed by fastpeft.lora_linear. lora_A is initialised like PEFT's default (kaiming-uniform, a=√5) and
    lora_B to zeros, so the wrapped layer starts out equal to the base layer. state_dict carries `merged`
    (see fastpeft.modules.merged_state), so a merged layer's state loads as merged.
    use_dora=True: PEFT's DoRA (LoraConfig(use_dora=True)); the instance is a DoRALinear (see there).
    A bitsandbytes Linear4bit base (NF4 / FP4, QLoRA) makes a QLoRALinear (see there).
    dropout_mask: "regenerate" (default: backward recomputes the dropout mask from its seed) or "packed" (forward
    stores it as bits for backward, M·ceil(in/8) bytes; see fastpeft.lora_linear; not for DoRA or QLoRA).
    """

    _fastpeft_adapter = "fused"  # computes with base_layer's weight, never calls it (see fastpeft.targets)
    use_dora = False
    dropout_mask = "regenerate"  # the class default (also for instances pickled before the option existed)

    def __new__(cls, *args, use_dora: bool = False, **kwargs):
        base = args[0] if args else kwargs.get("base_layer")
        if base is not None and is_linear4bit(base):  # a bitsandbytes 4-bit base: QLoRA
            if use_dora is True or issubclass(cls, DoRALinear):
                raise NotImplementedError(
                    "LoRALinear(use_dora=True) over a bitsandbytes 4-bit base (QDoRA) is not supported: fastpeft's "
                    "DoRA needs the row norms of a float W0. Use use_dora=False, or PEFT's own QDoRA")
            if cls is LoRALinear:
                cls = QLoRALinear
        elif use_dora is True and cls is LoRALinear:
            cls = DoRALinear
        return super().__new__(cls)

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str | None = None, adapter_dtype: torch.dtype | None = None,
                 use_dora: bool = False, dropout_mask: str = "regenerate"):
        super().__init__()
        if check_dropout_mask(dropout_mask) != "regenerate":
            if type(self) is not LoRALinear:
                raise NotImplementedError(f"dropout_mask={dropout_mask!r}: only LoRALinear over an nn.Linear takes "
                                          f"it, not {type(self).__name__}; use dropout_mask='regenerate'")
            self.dropout_mask = dropout_mask
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora: expected True or False, got {use_dora!r}")
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
        dtype = self._adapter_dtype(base_layer, adapter_dtype)
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

    @staticmethod
    def _adapter_dtype(base_layer: nn.Module, adapter_dtype: torch.dtype | None) -> torch.dtype:
        """lora_A / lora_B's dtype: adapter_dtype (None: the base weight's dtype), which must be that or fp32."""
        w = base_layer.weight
        if not w.dtype.is_floating_point:
            raise TypeError(f"base_layer: expected a floating-point weight, got {w.dtype} (a quantized "
                            f"{type(base_layer).__name__}; of the quantized layers fastpeft takes bitsandbytes' "
                            "Linear4bit, with its own forward)")
        dtype = adapter_dtype if adapter_dtype is not None else w.dtype
        if dtype not in (w.dtype, torch.float32):
            raise TypeError(f"adapter_dtype: expected None, {w.dtype} (the base layer's dtype) or torch.float32, got {dtype}")
        return dtype

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _tensors(self, *extra: str):
        """(W0, bias, lora_A, lora_B, *extra parameters) for forward: straight from the registries when they are
        there (a module attribute lookup costs ~0.7 µs), by getattr when something else provides them (a
        parametrization, a functional_call)."""
        base = self._modules.get("base_layer")
        if base is None:
            base = self.base_layer
        bp, own = base._parameters, self._parameters
        w, bias, a, b = bp.get("weight"), bp.get("bias", _MISSING), own.get("lora_A"), own.get("lora_B")
        more = tuple(own.get(n) for n in extra) if extra else ()
        if w is None or bias is _MISSING or a is None or b is None or any(t is None for t in more):
            return (base.weight, base.bias, self.lora_A, self.lora_B, *(getattr(self, n) for n in extra))
        return (w, bias, a, b, *more) if extra else (w, bias, a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        w, bias, a, b = self._tensors()
        return lora_linear_cached(self._call_cache, x, w, a, b, self.scaling, bias, self.lora_dropout, self.training,
                                  self.backend, dropout_mask=self.dropout_mask)

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
                f"use_rslora={self.use_rslora}, merged={self.merged}" + (", use_dora=True" if self.use_dora else "")
                + (f", dropout_mask={self.dropout_mask!r}" if self.dropout_mask != "regenerate" else ""))


class DoRALinear(LoRALinear):
    """LoRALinear(..., use_dora=True): HF PEFT's DoRA, y = m ⊙ (W0 + s·B·A)·x / ‖W0 + s·B·A‖ + b (see
    fastpeft.dora_linear for the exact definition, dropout included).

    The magnitude `lora_magnitude_vector` [out] (PEFT's name; in lora_A's dtype) starts as ‖W0 + s·B·A‖ per output
    row, as PEFT initialises it, so the layer starts equal to the base layer. The forward caches ‖w_i‖² of the
    frozen W0 (recomputed when W0 changes: see ops/dora_linear_cached.py). merge() folds the adapter in place,
    W0 ← m/‖W0 + s·B·A‖ ⊙ (W0 + s·B·A), keeping the norm it used in the buffer `dora_merged_norm` (saved with the
    state dict) for unmerge(); neither forms an [out, in] temporary (fp32 adapters over a 16-bit W0: row blocks).
    """

    use_dora = True

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str | None = None, adapter_dtype: torch.dtype | None = None,
                 use_dora: bool = True, dropout_mask: str = "regenerate"):
        if use_dora is not True:
            raise ValueError(f"use_dora: a DoRALinear is DoRA; expected True, got {use_dora!r}")
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, backend=backend,
                         adapter_dtype=adapter_dtype, dropout_mask=dropout_mask)
        w = base_layer.weight
        self._dora_cache = DoRACallCache()
        self.lora_magnitude_vector = nn.Parameter(self._norm().to(self.lora_A.dtype))
        self.register_buffer("dora_merged_norm", torch.zeros(w.shape[0], device=w.device, dtype=torch.float32))

    def _norm(self) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output row (fp32 [out], no grad), with ‖w_i‖² from the cache."""
        with torch.no_grad():
            w = self.base_layer.weight
            return dora_norm(w, self.lora_A, self.lora_B, self.scaling, cached_weight_sq_norm(self._dora_cache, w))

    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if "lora_magnitude_vector" in self._parameters:  # PEFT's init: ‖W0 + s·B·A‖ for the new A and B
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self._norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        w, bias, a, b, m = self._tensors("lora_magnitude_vector")
        return dora_linear_cached(self._dora_cache, x, w, a, b, m, self.scaling, bias, self.lora_dropout,
                                  self.training, self.backend)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← m/‖W0 + s·B·A‖ ⊙ (W0 + s·B·A) in place (PEFT's merge), the norm taken from the unmerged weights and
        kept for unmerge(); forward is then the plain linear. Refuses, before touching W0, a scale that is not
        finite (a zero norm) or zero (unmerge could not undo it)."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing to do", stacklevel=2)
            return
        norm = self._norm()
        g = self._scale(norm, "merge")
        self._rows_update(lambda acc, b, i, j: acc.addmm_(b, self._a32(acc), alpha=self.scaling).mul_(g[i:j, None]))
        self.dora_merged_norm.copy_(norm)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W0 ← W0·‖·‖/m − s·B·A with the norm merge() used (exact up to the rounding of W0's dtype)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing to do", stacklevel=2)
            return
        g = self._scale(self.dora_merged_norm, "unmerge")
        self._rows_update(lambda acc, b, i, j: acc.div_(g[i:j, None]).addmm_(b, self._a32(acc), alpha=-self.scaling))
        self.merged = False

    def _scale(self, norm: torch.Tensor, what: str) -> torch.Tensor:
        g = self.lora_magnitude_vector.to(torch.float32) / norm.to(self.lora_magnitude_vector.device)
        bad = ~torch.isfinite(g) | (g == 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"LoRALinear.{what}(): the DoRA scale m/‖W0 + s·B·A‖ of output row {i} is {g[i].item()} "
                             f"(magnitude {self.lora_magnitude_vector[i].item()}, norm {norm[i].item()}); a zero or "
                             "non-finite scale cannot be merged and undone. W0 is unchanged")
        return g

    def _a32(self, acc: torch.Tensor) -> torch.Tensor:
        return self.lora_A if self.lora_A.dtype == acc.dtype else self.lora_A.to(acc.dtype)

    def _rows_update(self, fn) -> None:
        """W0[i:j] ← fn(acc, B[i:j], i, j): acc = W0 itself for an fp32 W0 (in place, no temporary), else an fp32
        copy of a block of rows, rounded into W0 once."""
        w, b = self.base_layer.weight, self.lora_B
        if w.dtype == torch.float32:
            fn(w, b.to(w.dtype), 0, w.shape[0])
            return
        rows = max(1, min((w.shape[0] + 1) // 2, _MERGE_CHUNK_ELEMENTS // max(1, w.shape[1])))
        for i in range(0, w.shape[0], rows):
            block = w[i:i + rows]
            block.copy_(fn(block.float(), b[i:i + rows].float(), i, i + rows))


class QLoRALinear(LoRALinear):
    """LoRALinear over a bitsandbytes 4-bit base (Linear4bit / LinearNF4 / LinearFP4: NF4 or FP4, any blocksize,
    with or without double quantization): QLoRA, as PEFT's lora.bnb.Linear4bit computes it.

    y = deq(W0)·x + bias + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ by fastpeft.qlora_linear, W0 staying packed. As
    bitsandbytes' Linear4bit does, x is cast to the base layer's compute_dtype (taken from the first input when it
    has none) and the output returned in x's dtype. lora_A / lora_B are in the compute dtype (fp32 when the layer
    has none yet), or adapter_dtype (the compute dtype or fp32). The Quant4 view of the packed weight is built and
    checked once per layer and again when the weight or its QuantState is replaced, moved or re-quantized
    (ops/qlora_linear_cached.py). W0 is quantized: merge() and unmerge() raise. DoRA over it (QDoRA) is refused.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str | None = None, adapter_dtype: torch.dtype | None = None,
                 use_dora: bool = False, dropout_mask: str = "regenerate"):
        if use_dora is not False:
            raise NotImplementedError("QLoRALinear: use_dora=True over a 4-bit base (QDoRA) is not supported")
        if check_dropout_mask(dropout_mask) != "regenerate":
            raise NotImplementedError(f"dropout_mask={dropout_mask!r}: only LoRALinear over an nn.Linear takes it, "
                                      "not QLoRALinear; use dropout_mask='regenerate'")
        if not is_linear4bit(base_layer):
            raise TypeError(f"base_layer: expected a bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        cd = getattr(base_layer, "compute_dtype", None)
        if cd is not None and cd not in FLOAT_DTYPES:
            raise TypeError(f"base_layer.compute_dtype: the QLoRA kernels compute in one of "
                            f"{[str(d) for d in FLOAT_DTYPES]}, got {cd}")
        bias = base_layer.bias
        if bias is not None and not bias.dtype.is_floating_point:
            raise TypeError(f"base_layer.bias: a quantized bias ({bias.dtype}) is not supported; bitsandbytes keeps "
                            "Linear4bit's bias in floating point")
        w = base_layer.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None:  # every check of the packed weight now (the forward caches the result)
            from ..ops.qlora_linear import quant4

            quant4(w, qs)
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, backend=backend,
                         adapter_dtype=adapter_dtype)
        self._call_cache = QLoRACallCache()

    @staticmethod
    def _adapter_dtype(base_layer: nn.Module, adapter_dtype: torch.dtype | None) -> torch.dtype:
        cd = getattr(base_layer, "compute_dtype", None) or torch.float32
        dtype = adapter_dtype if adapter_dtype is not None else cd
        if dtype not in (cd, torch.float32):
            raise TypeError(f"adapter_dtype: expected None, {cd} (the 4-bit base layer's compute dtype) or "
                            f"torch.float32, got {dtype}")
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._modules.get("base_layer")
        if base is None:
            base = self.base_layer
        w = base.weight
        qs = getattr(w, "quant_state", None)
        if qs is None:  # the state bitsandbytes keeps on the module when a conversion dropped it (FSDP)
            qs = getattr(base, "quant_state", None)
        return qlora_linear_cached(self._call_cache, x, w, qs, self.lora_A, self.lora_B, self.scaling, base.bias,
                                   self.lora_dropout, self.training, self.backend, compute=compute_dtype(base, x))

    def merge(self) -> None:
        raise NotImplementedError(
            "LoRALinear.merge(): the base layer is a bitsandbytes 4-bit Linear4bit; W0 is quantized, so W0 + ΔW "
            "cannot be stored without re-quantizing it (which changes the model). Keep the adapter unmerged, or "
            "dequantize the base layer to a float nn.Linear first")

    def unmerge(self) -> None:
        raise NotImplementedError("LoRALinear.unmerge(): the base layer is a bitsandbytes 4-bit Linear4bit; a "
                                  "QLoRA layer is never merged")

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        if self.merged:
            self.merged = False
            raise ValueError("QLoRALinear: the state dict says the layer is merged; a layer over a 4-bit base is "
                             "never merged (its W0 is quantized)")
