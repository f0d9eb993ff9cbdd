"""MultiLoRALinear: one frozen nn.Linear shared by a fixed-capacity pool of LoRA adapters, one per token or sequence."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .._checks import check_finite_number, check_positive_int
from ..ops.call_cache import CallCache, cacheable, tensor_key
from ..ops.multi_lora import (
    AdapterTable, apply_multi_lora, check_multi_lora_inputs, prepare_ids, resolve_multi_backend,
)
from .lora import LoRALinear


def _sync_after_load(module: "MultiLoRALinear", incompatible_keys) -> None:
    """load_state_dict post hook (a module-level function, so that the module pickles)."""
    module._sync_host()


class MultiLoRALinear(nn.Module):
    """A frozen base layer (`base_layer`) plus `num_adapters` adapter slots of rank up to `r` each.

    y_m = base_layer(x_m) + s_a·(x_m·A_aᵀ)·B_aᵀ with a = adapter_ids[m] (-1: base only), computed by
    fastpeft.multi_lora_linear with W0 read once for the whole mixed batch. The pool is two Parameters,
    `lora_A` [num_adapters·r, in] and `lora_B` [out, num_adapters·r]; slot i owns rank rows i·r .. i·r + r_i,
    so every slot takes any adapter of rank <= r, and the kernels move each adapter's own rank r_i. Slot
    ranks, offsets and scalings are buffers updated in place: loading or unloading an adapter recompiles
    nothing and keeps a captured CUDA graph valid. With init_adapters (default) every slot starts as a fresh
    PEFT-initialised adapter of rank r (A kaiming-uniform, B zero: training several adapters at once); without
    it every slot starts empty (serving: load adapters into it).
    """

    _fastpeft_adapter = "fused"  # computes with base_layer's weight, never calls it (see fastpeft.targets)

    def __init__(self, base_layer: nn.Linear, num_adapters: int, r: int = 8, alpha: float = 16,
                 use_rslora: bool = False, init_adapters: bool = True, backend: str | None = None,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected an nn.Linear, got {type(base_layer).__name__}")
        if base_layer.in_features < 1 or base_layer.out_features < 1:
            raise ValueError(f"base_layer: expected in_features >= 1 and out_features >= 1, got "
                             f"in_features={base_layer.in_features}, out_features={base_layer.out_features}")
        self.num_adapters = check_positive_int("num_adapters", num_adapters)
        self.r = check_positive_int("r", r)
        self.lora_alpha = check_finite_number("alpha", alpha)
        self.use_rslora = bool(use_rslora)
        self.backend = backend
        self.check_ids = True  # False skips the id check (a device sync for CUDA ids), e.g. for graph capture
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        w = base_layer.weight
        dtype = adapter_dtype if adapter_dtype is not None else w.dtype
        if dtype not in (w.dtype, torch.float32):
            raise TypeError(f"adapter_dtype: expected None, {w.dtype} (the base layer's dtype) or torch.float32, got {dtype}")
        total = self.num_adapters * self.r
        self.lora_A = nn.Parameter(torch.zeros(total, base_layer.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, total, device=w.device, dtype=dtype))
        n = self.num_adapters
        self.register_buffer("adapter_rank", torch.zeros(n, dtype=torch.int32, device=w.device))
        self.register_buffer("adapter_offset", torch.arange(n, dtype=torch.int32, device=w.device) * self.r)
        self.register_buffer("adapter_scaling", torch.zeros(n, dtype=torch.float32, device=w.device))
        self._ranks = [0] * n
        self._offsets = [i * self.r for i in range(n)]
        self.adapter_names: list[str | None] = [None] * n
        self._context = None  # set by fastpeft.inject_multi_lora's hook for one model call
        self._call_cache = CallCache()  # the validated signature of the last call (see forward)
        self.register_load_state_dict_post_hook(_sync_after_load)
        if init_adapters:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # per row block: PEFT's init of each adapter
            for i in range(n):
                self._set_slot(i, self.r, self.default_scaling(self.r))

    # -------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_lora_layers(cls, layers: Sequence[LoRALinear], capacity: int | None = None, names=None,
                         backend: str | None = None) -> "MultiLoRALinear":
        """A pool holding the adapters of several LoRALinear layers over the same base layer, in slots 0..len-1.

        capacity: number of slots (default len(layers)); r is the largest rank among the layers.
        """
        layers = list(layers)
        if not layers or not all(isinstance(m, LoRALinear) for m in layers):
            raise TypeError("layers: expected a non-empty sequence of fastpeft.LoRALinear")
        base = layers[0].base_layer
        for i, m in enumerate(layers[1:], 1):
            if m.base_layer.weight.shape != base.weight.shape or not torch.equal(m.base_layer.weight, base.weight):
                raise ValueError(f"layers[{i}]: expected the same base weight as layers[0]")
            if m.merged:
                raise ValueError(f"layers[{i}]: is merged; unmerge it first")
        if layers[0].merged:
            raise ValueError("layers[0]: is merged; unmerge it first")
        capacity = len(layers) if capacity is None else check_positive_int("capacity", capacity)
        if capacity < len(layers):
            raise ValueError(f"capacity: expected at least {len(layers)} (the number of layers), got {capacity}")
        names = list(names) if names is not None else [None] * len(layers)
        pool = cls(base, capacity, r=max(m.r for m in layers), alpha=layers[0].lora_alpha, init_adapters=False,
                   backend=backend, adapter_dtype=layers[0].lora_A.dtype)
        for i, m in enumerate(layers):
            pool.load_adapter(i, m.lora_A.detach(), m.lora_B.detach(), scaling=m.scaling, name=names[i])
        return pool

    def default_scaling(self, r: int, alpha: float | None = None, use_rslora: bool | None = None) -> float:
        alpha = self.lora_alpha if alpha is None else check_finite_number("alpha", alpha)
        rs = self.use_rslora if use_rslora is None else use_rslora
        return alpha / (math.sqrt(r) if rs else r)

    # -------------------------------------------------------------------------------------------- pool management

    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_adapters:
            raise ValueError(f"slot: expected an int in [0, {self.num_adapters}), got {slot!r}")
        return slot

    def _set_slot(self, slot: int, rank: int, scaling: float) -> None:
        self._ranks[slot] = rank
        self.adapter_rank[slot] = rank  # in place: the buffers keep their storage (CUDA-graph safe)
        self.adapter_scaling[slot] = scaling

    def _sync_host(self) -> None:
        self._ranks = [int(v) for v in self.adapter_rank.tolist()]
        self._offsets = [int(v) for v in self.adapter_offset.tolist()]

    @torch.no_grad()
    def load_adapter(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, *, alpha: float | None = None,
                     scaling: float | None = None, use_rslora: bool | None = None, name: str | None = None) -> int:
        """Copy an adapter (A [r_i, in], B [out, r_i], r_i <= r) into `slot`; returns the slot.

        scaling: as given, else alpha / r_i (alpha / sqrt(r_i) with use_rslora), alpha defaulting to the module's.
        Everything is checked before the slot is written: on an error the module is unchanged.
        """
        slot = self._check_slot(slot)
        r_i, scaling = self.check_adapter(lora_A, lora_B, alpha=alpha, scaling=scaling, use_rslora=use_rslora)
        o = self._offsets[slot]
        self.lora_A[o:o + self.r].zero_()
        self.lora_B[:, o:o + self.r].zero_()
        self.lora_A[o:o + r_i].copy_(lora_A)
        self.lora_B[:, o:o + r_i].copy_(lora_B)
        self._set_slot(slot, r_i, scaling)
        self.adapter_names[slot] = name
        return slot

    def check_adapter(self, lora_A, lora_B, *, alpha: float | None = None, scaling: float | None = None,
                      use_rslora: bool | None = None) -> tuple[int, float]:
        """Validate an adapter for load_adapter without writing anything; returns (its rank, its scaling)."""
        in_f, out_f = self.base_layer.in_features, self.base_layer.out_features
        for nm, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise TypeError(f"{nm}: expected a 2-D float tensor, got {t!r:.80}")
            if t.is_meta and not self.lora_A.is_meta:
                raise ValueError(f"{nm}: expected a tensor with data, got a meta tensor of shape {tuple(t.shape)}")
        r_i = lora_A.shape[0]
        if not 1 <= r_i <= self.r or lora_A.shape[1] != in_f:
            raise ValueError(f"lora_A: expected shape [r_i, {in_f}] with 1 <= r_i <= {self.r} (the pool's rank), "
                             f"got {tuple(lora_A.shape)}")
        if tuple(lora_B.shape) != (out_f, r_i):
            raise ValueError(f"lora_B: expected shape [{out_f}, {r_i}], got {tuple(lora_B.shape)}")
        if scaling is None:
            scaling = self.default_scaling(r_i, alpha, use_rslora)
        return r_i, check_finite_number("scaling", scaling)

    @torch.no_grad()
    def unload_adapter(self, slot: int) -> None:
        """Empty `slot`: its rows are zeroed and ids that point at it are rejected (or, unchecked, base only)."""
        slot = self._check_slot(slot)
        o = self._offsets[slot]
        self.lora_A[o:o + self.r].zero_()
        self.lora_B[:, o:o + self.r].zero_()
        self._set_slot(slot, 0, 0.0)
        self.adapter_names[slot] = None

    def free_slot(self) -> int | None:
        """The first empty slot, or None when the pool is full."""
        return next((i for i, r in enumerate(self._ranks) if r == 0), None)

    @property
    def ranks(self) -> list[int]:
        """Rank per slot (0 = empty)."""
        return list(self._ranks)

    def get_adapter(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r_i, in], B [out, r_i], scaling) of a loaded slot, as views of the pool."""
        slot = self._check_slot(slot)
        r_i, o = self._ranks[slot], self._offsets[slot]
        if r_i == 0:
            raise ValueError(f"slot: slot {slot} is empty")
        return self.lora_A[o:o + r_i], self.lora_B[:, o:o + r_i], float(self.adapter_scaling[slot])

    # -------------------------------------------------------------------------------------------- forward

    def table(self) -> AdapterTable:
        return AdapterTable.wrap(self.adapter_rank, self.adapter_offset, self.adapter_scaling, self._ranks,
                                 self._offsets, self.r)

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        """x [..., in]; adapter_ids per token ([M] or x.shape[:-1]) or per sequence ([batch] for 3-D x), -1 base only.

        Without adapter_ids, the ids of the current fastpeft.inject_multi_lora model call are used.
        The tensor checks and the backend choice run on the first call and again only when the call's signature
        changes (ops/call_cache.py): x's dtype, device and last dimension; the shape, dtype and device of the
        base weight, bias and pool; the slot buffers and host lists replaced (load_state_dict, .to()); r,
        num_adapters, backend. The ids are checked on every call (check_ids): their values change per call.
        """
        checked = False
        if adapter_ids is None:
            if self._context is None or self._context.ids is None:
                raise ValueError("adapter_ids: expected ids per token or per sequence (or a model call with "
                                 "adapter_names=... after fastpeft.inject_multi_lora), got None")
            adapter_ids, checked = self._context.ids, True  # mapped from names: valid by construction
        w, bias = self.base_layer.weight, self.base_layer.bias
        if not cacheable(x):  # traced by torch.compile, or a tensor subclass (or not a tensor): checked every call
            return self._forward_checked(x, w, bias, adapter_ids, checked)
        slots = (self.adapter_rank, self.adapter_offset, self.adapter_scaling, self._ranks, self._offsets)
        # the slots' objects by identity (the plan holds them, so no id is reused); values are read at run time
        key = (x.dtype, x.device, x.shape[-1], tensor_key(w), tensor_key(bias), tensor_key(self.lora_A),
               tensor_key(self.lora_B), tuple(map(id, slots)), self.r, self.num_adapters, self.backend)
        cache = self._call_cache
        if key != cache.key:
            cache.key = None  # a failure below leaves the cache empty
            self._check_tensors(x, w, bias)
            table = self.table()
            name = resolve_multi_backend(self.backend, x.device, table)
            # the table may be reused while it reads the slot buffers themselves (not the copy wrap makes of a
            # buffer cast to another dtype, which would miss a later load_adapter)
            same = (table.ranks is self.adapter_rank and table.offsets is self.adapter_offset
                    and self.adapter_scaling.dtype == torch.float32)
            cache.plan = (table if same else None, name, slots)
            cache.key = key
        table, name, _ = cache.plan
        if table is None:
            table = self.table()
        check = self.check_ids and not checked
        ids, grouped = prepare_ids(adapter_ids, x, self.num_adapters, check,
                                   loaded=[r > 0 for r in self._ranks] if check else None)
        return apply_multi_lora(x, w, self.lora_A, self.lora_B, bias, ids, table, grouped, name)

    def _check_tensors(self, x, w, bias) -> None:
        if isinstance(x, torch.Tensor) and self.lora_A.is_meta and not x.is_meta:
            raise ValueError(f"x: the module's parameters are on the meta device (built under torch.device('meta')), "
                             f"x is on {x.device}: materialise the module first (to_empty(device=...) then "
                             f"load_state_dict), or pass a meta x for shapes only")
        check_multi_lora_inputs(x, w, self.lora_A, self.lora_B, bias)

    def _forward_checked(self, x, w, bias, adapter_ids, checked: bool) -> torch.Tensor:
        """forward with every check on this call (traced, or a tensor subclass)."""
        self._check_tensors(x, w, bias)
        table = self.table()
        name = resolve_multi_backend(self.backend, x.device, table)
        ids, grouped = prepare_ids(adapter_ids, x, self.num_adapters, self.check_ids and not checked,
                                   # compiled: a tensor, so that loading an adapter does not recompile
                                   loaded=(self.adapter_rank > 0) if torch.compiler.is_compiling()
                                   else [r > 0 for r in self._ranks])
        return apply_multi_lora(x, w, self.lora_A, self.lora_B, bias, ids, table, grouped, name)

    def extra_repr(self) -> str:
        loaded = sum(r > 0 for r in self._ranks)
        return (f"in_features={self.base_layer.in_features}, out_features={self.base_layer.out_features}, "
                f"num_adapters={self.num_adapters}, r={self.r}, loaded={loaded}, alpha={self.lora_alpha:g}, "
                f"use_rslora={self.use_rslora}")
