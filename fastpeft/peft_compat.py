"""patch_peft / unpatch_peft: run an HF PEFT model's LoRA Linear layers through fastpeft.lora_linear.

patch_peft swaps the class of every `peft.tuners.lora.layer.Linear` for a subclass whose forward computes
PEFT's own formula, base(x) + Σ_active scaling·lora_B(lora_A(dropout(x))), with the first active adapter
fused into the base GEMM by fastpeft.lora_linear. It reads PEFT's own parameters and settings on every call
(lora_A[name].weight, lora_B[name].weight, scaling[name] as PEFT stored it, so rsLoRA and scale_layer are
honoured, and the p and training flag of lora_dropout[name]), so training, save_pretrained, load_adapter,
set_adapter, merge and disable_adapter all keep working. Further active adapters add their terms with PEFT's
own modules. State dict, parameters and hooks are untouched; unpatch_peft swaps the class back.

DoRA adapters (use_dora=True) are fused too: a first active DoRA adapter runs through fastpeft.dora_linear with
PEFT's magnitude (lora_magnitude_vector[name].weight) and PEFT's semantics (dropout's base term included), ‖w_i‖²
of the frozen base weight cached on the layer (ops/dora_linear_cached.py); a DoRA adapter active after another
one runs PEFT's own DoRA forward on the summed result, as PEFT computes it.

QLoRA: PEFT's lora.bnb.Linear4bit layers (LoRA over a bitsandbytes Linear4bit, NF4 or FP4) are fused too, into a
subclass of that class, through fastpeft.qlora_linear (W0 stays packed; x cast to the base layer's compute dtype
and the result returned in x's dtype, as bitsandbytes does), with the packed weight's checks cached per layer
(ops/qlora_linear_cached.py). Further active adapters add PEFT's own terms, as for the plain Linear.

What fastpeft cannot fuse stays on PEFT's path, never silently: other LoRA variants, lora_bias, fan_in_fan_out,
DoRA over a 4-bit base (QDoRA), LoRA on other bases (Embedding, Conv, 8-bit layers), base layers with their own
hooks or forward, adapter_names mixed batches, DoRA with backend="cuda" (no CUDA C++ kernels for it), and dtype
combinations PEFT handles by casting.
"""
from __future__ import annotations

import functools
import numbers
import warnings

import torch
from torch import nn

from ._backend import requested_backend
from ._checks import FLOAT_DTYPES
from .autocast import autocast_dtype
from .ops.dora_linear_cached import DoRACallCache, dora_linear_cached
from .ops.lora_linear_cached import LoRACallCache, call_signature, lora_linear_cached
from .ops.qlora_linear_cached import QLoRACallCache, compute_dtype, qlora_linear_cached
from .targets import is_linear4bit

_PATCHED_NAME = "FastpeftLoraLinear"
_PATCHED_4BIT_NAME = "FastpeftLoraLinear4bit"
_PEFT_BNB_MODULE = "peft.tuners.lora.bnb"
_PEFT_KWARGS = frozenset(("adapter_names", "alora_offsets"))
_warned: set = set()


def _peft_linear_cls():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:  # peft is optional
        raise ImportError(f"fastpeft.patch_peft needs HF PEFT (pip install peft): {exc}") from exc
    return Linear


def _lora_layer_cls():
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


@functools.lru_cache(maxsize=None)
def _fused_class():
    base = _peft_linear_cls()
    return type(_PATCHED_NAME, (base,), {
        "forward": _fused_forward, "__module__": __name__, "__qualname__": _PATCHED_NAME,
        "_get_name": lambda self: base.__name__,  # repr prints `lora.Linear(...)` as PEFT's own layer does
        "__doc__": f"PEFT's LoRA Linear with its forward run by fastpeft.lora_linear (made by fastpeft.patch_peft).",
    })


def _is_peft_linear4bit_cls(cls) -> bool:
    """Whether cls is PEFT's lora.bnb.Linear4bit (told by name: importing it would import bitsandbytes)."""
    return cls.__name__ == "Linear4bit" and cls.__module__ == _PEFT_BNB_MODULE


@functools.lru_cache(maxsize=None)
def _fused_4bit_class(base):
    """The patched subclass of PEFT's lora.bnb.Linear4bit (`base`)."""
    return type(_PATCHED_4BIT_NAME, (base,), {
        "forward": _fused_forward_4bit, "__module__": __name__, "__qualname__": _PATCHED_4BIT_NAME,
        "_get_name": lambda self: base.__name__,  # repr prints `lora.Linear4bit(...)` as PEFT's own layer does
        "__doc__": "PEFT's LoRA Linear4bit (QLoRA) with its forward run by fastpeft.qlora_linear (made by "
                   "fastpeft.patch_peft).",
    })


def __getattr__(name):  # pickle finds the patched class by module and name; peft is imported only then
    if name == _PATCHED_NAME:
        return _fused_class()
    if name == _PATCHED_4BIT_NAME:
        from peft.tuners.lora.bnb import Linear4bit

        return _fused_4bit_class(Linear4bit)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------ what can fuse


def _layer_reason(layer) -> str | None:
    """Why this whole PEFT Linear must stay on PEFT's path, or None."""
    base = layer.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer {type(base).__name__} (fastpeft fuses plain nn.Linear bases)"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    if "forward" in vars(layer) or "_old_forward" in vars(layer):
        return "the layer's forward is replaced on the instance (e.g. an accelerate hook)"
    return None


def _layer_reason_4bit(layer) -> str | None:
    """Why this whole PEFT lora.bnb.Linear4bit must stay on PEFT's path, or None."""
    base = layer.base_layer
    if not is_linear4bit(base):
        return f"base layer {type(base).__name__} of a 4-bit LoRA layer (fastpeft fuses bitsandbytes' Linear4bit)"
    if "forward" in vars(layer) or "_old_forward" in vars(layer):
        return "the layer's forward is replaced on the instance (e.g. an accelerate hook)"
    cd = getattr(base, "compute_dtype", None)
    if cd is not None and cd not in FLOAT_DTYPES:
        return f"4-bit base with compute_dtype {cd} (the QLoRA kernels compute in fp32, fp16 or bf16)"
    if base.bias is not None and not base.bias.dtype.is_floating_point:
        return f"4-bit base with a quantized bias ({base.bias.dtype})"
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        from .ops.qlora_linear import quant4

        try:
            quant4(w, qs)
        except (TypeError, ValueError) as exc:
            return f"4-bit weight fastpeft cannot read ({exc})"
    return None


def _adapter_reason_4bit(layer, name: str, backend: str | None = None) -> str | None:
    """Why adapter `name` of a PEFT lora.bnb.Linear4bit stays on PEFT's path, or None."""
    if _is_dora(layer, name):
        return "DoRA over a 4-bit base (QDoRA)"
    if backend is not None and backend.lower() not in ("auto", "torch", "triton"):
        return f"backend={backend!r} over a 4-bit base (QLoRA runs on the torch and triton backends)"
    return _adapter_reason(layer, name, backend)


def _is_dora(layer, name: str) -> bool:
    variant = getattr(layer, "lora_variant", {}).get(name)
    return bool(getattr(layer, "use_dora", {}).get(name, False)) or (
        variant is not None and type(variant).__name__ == "DoraLinearVariant")


def _dora_reason(layer, name: str, backend: str | None) -> str | None:
    """Why DoRA adapter `name` stays on PEFT's path, or None."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is None or type(variant).__name__ != "DoraLinearVariant":
        return f"DoRA with LoRA variant {type(variant).__name__}"
    mags = getattr(layer, "lora_magnitude_vector", None)
    mag = mags[name] if mags is not None and name in mags else None
    weight = getattr(mag, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "DoRA without a 1-D lora_magnitude_vector weight"
    if getattr(mag, "fan_in_fan_out", False):
        return "DoRA with fan_in_fan_out=True"
    if getattr(layer, "ephemeral_gpu_offload", False):
        return "DoRA with ephemeral_gpu_offload=True"
    if backend is not None and backend.lower() == "cuda":
        return "DoRA with backend='cuda' (no CUDA C++ kernels for DoRA)"
    return None


def _adapter_reason(layer, name: str, backend: str | None = None) -> str | None:
    """Why adapter `name` of this layer stays on PEFT's path, or None."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if _is_dora(layer, name):
        reason = _dora_reason(layer, name, backend)
        if reason is not None:
            return reason
    elif variant is not None:
        return f"LoRA variant {type(variant).__name__}"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias=True"
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None:
        return f"lora_A/lora_B of type {type(lora_a).__name__}/{type(lora_b).__name__}"
    drop = layer.lora_dropout[name]
    if type(drop) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout of type {type(drop).__name__}"
    if isinstance(drop, nn.Dropout) and not 0.0 <= drop.p < 1.0:
        return f"lora_dropout p={drop.p} (fastpeft takes p in [0, 1))"
    scaling = layer.scaling.get(name)
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        return f"scaling of type {type(scaling).__name__}"
    return None


def _dtype_reason(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> str | None:
    """Why this call's dtypes/devices need PEFT's casting, or None (mirrors lora_linear_amp's casts)."""
    ac = autocast_dtype(x.device)
    xd = ac if ac is not None and x.dtype in FLOAT_DTYPES else x.dtype
    wd = ac if ac is not None and weight.dtype in FLOAT_DTYPES else weight.dtype
    if xd not in FLOAT_DTYPES:
        return f"input dtype {x.dtype}"
    if wd != xd:
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype}"
    if lora_a.dtype != lora_b.dtype:
        return f"lora_A dtype {lora_a.dtype} differs from lora_B's {lora_b.dtype}"
    ad = lora_a.dtype if ac is None or lora_a.dtype == torch.float32 else ac
    if ad not in (xd, torch.float32):
        return f"adapter dtype {lora_a.dtype} with input dtype {xd}"
    if not (x.device == weight.device == lora_a.device):
        return f"input on {x.device}, base weight on {weight.device}, adapter on {lora_a.device}"
    return None


# ------------------------------------------------------------------------------------------ the forward


def _first_adapter(self, x, args, kwargs, reason_of):
    """(active, a0, lin_a, lin_b, drop, base) of a call fastpeft fuses (its first active adapter), or None where the
    call stays on PEFT's path (a mixed batch, disabled or merged adapters, an adapter reason_of refuses, hooks)."""
    if args or self.disable_adapters or self.merged or (kwargs and (
            not _PEFT_KWARGS.issuperset(kwargs) or any(v is not None for v in kwargs.values()))):
        if kwargs.get("adapter_names") is not None:
            _warn_once("adapter_names", "fastpeft.patch_peft: a forward with adapter_names (a mixed batch) runs on "
                                        "PEFT's own path; fastpeft fuses calls without adapter_names")
        return None
    mods = self._modules
    lora_as = mods["lora_A"]._modules
    active = [a for a in self.active_adapters if a in lora_as]
    if not active:
        return None
    a0 = active[0]
    lin_a, lin_b, drop = lora_as[a0], mods["lora_B"]._modules[a0], mods["lora_dropout"]._modules[a0]
    ok = self.__dict__.get("_fastpeft_ok")
    # the adapters' structural checks hold while the adapter's modules are the same objects (PEFT replaces them
    # when it (re)creates an adapter); a bias added to lora_A later is checked on every call
    if ok is None or ok[0] != active or ok[1] is not lin_a or ok[2] is not lin_b or ok[3] is not drop \
            or lin_a._parameters.get("bias") is not None:
        for a in active:
            reason = reason_of(self, a, self._fastpeft_backend)
            if reason is not None:
                _warn_once(("adapter", a, reason),
                           f"fastpeft.patch_peft: adapter {a!r} ({reason}) cannot be fused; layers using it "
                           f"(first: {getattr(self, '_fastpeft_name', '?')}) run on PEFT's path")
                return None
        self.__dict__["_fastpeft_ok"] = (active, lin_a, lin_b, drop)
    base = mods["base_layer"]
    if (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
            or "forward" in base.__dict__):
        _warn_once(("hooks", self._fastpeft_name),
                   f"fastpeft.patch_peft: the base layer of {self._fastpeft_name} has hooks or its own forward; "
                   "it runs on PEFT's path so that they run")
        return None
    return active, a0, lin_a, lin_b, drop, base


def _fused_forward(self, x, *args, **kwargs):
    peft_forward = _peft_linear_cls().forward
    plan = _first_adapter(self, x, args, kwargs, _adapter_reason)
    if plan is None:
        return peft_forward(self, x, *args, **kwargs)
    active, a0, lin_a, lin_b, drop, base = plan
    weight, bias = base.weight, base.bias
    lora_a, lora_b = lin_a.weight, lin_b.weight
    p = drop.p if type(drop) is nn.Dropout else 0.0
    scaling = self.scaling[a0]
    backend = self._fastpeft_backend
    key = call_signature(x, weight, lora_a, lora_b, bias, scaling, p, backend)
    if a0 in self.__dict__.get("lora_variant", ()):  # DoRA (the only variant _adapter_reason lets through)
        result = _dora_first(self, x, key, weight, bias, lora_a, lora_b, a0, p, drop, scaling, backend)
        if result is None:
            return peft_forward(self, x)
    else:
        cache = self.__dict__.get("_fastpeft_cache")
        if cache is None:
            cache = self.__dict__["_fastpeft_cache"] = LoRACallCache()
        if key is None or key != cache.key:  # checked again only when a dtype, device or shape changes
            reason = _dtype_reason(x, weight, lora_a, lora_b)
            if reason is not None:
                _warn_once(("dtype", reason), f"fastpeft.patch_peft: {reason}: {self._fastpeft_name} and layers like "
                                              "it run on PEFT's path, which casts")
                return peft_forward(self, x)
        result = lora_linear_cached(cache, x, weight, lora_a, lora_b, scaling, bias, p, drop.training, backend,
                                    key=key)
    if len(active) > 1:  # further adapters: PEFT's own term for each, summed as PEFT sums them
        dtype = result.dtype
        for a in active[1:]:
            lin_a = self.lora_A[a]
            xa = self._cast_input_dtype(x, lin_a.weight.dtype)
            if a in self.__dict__.get("lora_variant", ()):  # DoRA: PEFT's own forward on the sum so far, as PEFT
                result = self.lora_variant[a].forward(self, active_adapter=a, x=xa, result=result)
            else:
                result = result + self.lora_B[a](lin_a(self.lora_dropout[a](xa))) * self.scaling[a]
        result = result.to(dtype)
    return result


def _fused_forward_4bit(self, x, *args, **kwargs):
    """PEFT's lora.bnb.Linear4bit forward with the first active adapter fused into the 4-bit GEMM."""
    peft_forward = type(self).__bases__[0].forward
    plan = _first_adapter(self, x, args, kwargs, _adapter_reason_4bit)
    if plan is None:
        return peft_forward(self, x, *args, **kwargs)
    active, a0, lin_a, lin_b, drop, base = plan
    weight, bias = base.weight, base.bias
    qs = getattr(weight, "quant_state", None)
    if qs is None:  # the state bitsandbytes keeps on the module when a conversion dropped it (FSDP)
        qs = getattr(base, "quant_state", None)
    lora_a, lora_b = lin_a.weight, lin_b.weight
    cd = compute_dtype(base, x)
    sig = (x.dtype, x.device, cd, lora_a.dtype, lora_b.dtype, lora_a.device, weight.device)
    if self.__dict__.get("_fastpeft_q4_sig") != sig:  # checked again only when a dtype or device changes
        reason = _dtype_reason_4bit(x, cd, weight, lora_a, lora_b)
        if reason is not None:
            _warn_once(("dtype", reason), f"fastpeft.patch_peft: {reason}: {self._fastpeft_name} and layers like "
                                          "it run on PEFT's path, which casts")
            return peft_forward(self, x)
        self.__dict__["_fastpeft_q4_sig"] = sig
    cache = self.__dict__.get("_fastpeft_cache")
    if cache is None:
        cache = self.__dict__["_fastpeft_cache"] = QLoRACallCache()
    p = drop.p if type(drop) is nn.Dropout else 0.0
    result = qlora_linear_cached(cache, x, weight, qs, lora_a, lora_b, self.scaling[a0], bias, p, drop.training,
                                 self._fastpeft_backend, compute=cd)
    for a in active[1:]:  # further adapters: PEFT's own term for each, summed as PEFT sums them
        lin_a = self.lora_A[a]
        xa = self._cast_input_dtype(x, lin_a.weight.dtype)
        result = result + (self.lora_B[a](lin_a(self.lora_dropout[a](xa))) * self.scaling[a]).to(result.dtype)
    return result


def _dtype_reason_4bit(x, cd, weight, lora_a, lora_b) -> str | None:
    """Why this call's dtypes/devices over a 4-bit base need PEFT's casting, or None."""
    if not x.dtype.is_floating_point:
        return f"input dtype {x.dtype}"
    if lora_a.dtype != lora_b.dtype:
        return f"lora_A dtype {lora_a.dtype} differs from lora_B's {lora_b.dtype}"
    if lora_a.dtype not in (cd, torch.float32):
        return f"adapter dtype {lora_a.dtype} with the 4-bit base's compute dtype {cd}"
    if not (x.device == weight.device == lora_a.device):
        return f"input on {x.device}, base weight on {weight.device}, adapter on {lora_a.device}"
    return None


def _dora_first(self, x, key, weight, bias, lora_a, lora_b, a0, p, drop, scaling, backend):
    """The first active adapter, a DoRA one, through fastpeft.dora_linear; None: PEFT's path (dtypes it casts)."""
    cache = self.__dict__.get("_fastpeft_dora_cache")
    if cache is None:
        cache = self.__dict__["_fastpeft_dora_cache"] = DoRACallCache()
    if key is None or key != cache.sig:  # checked again only when a dtype, device or shape changes
        reason = _dtype_reason(x, weight, lora_a, lora_b)
        if reason is not None:
            _warn_once(("dtype", reason), f"fastpeft.patch_peft: {reason}: {self._fastpeft_name} and layers like it "
                                          "run on PEFT's path, which casts")
            return None
    magnitude = self._modules["lora_magnitude_vector"]._modules[a0].weight
    # PEFT drops (base term included) when the layer trains and its dropout is an nn.Dropout; nn.Dropout in eval
    # mode is the identity
    training = self.training and drop.training
    return dora_linear_cached(cache, x, weight, lora_a, lora_b, magnitude, scaling, bias, p, training, backend,
                              key=key)


# ------------------------------------------------------------------------------------------ public API


def patch_peft(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Run the LoRA Linear layers of a PEFT model (peft.get_peft_model / PeftModel) through fastpeft, DoRA
    (use_dora=True) layers through fastpeft.dora_linear, QLoRA layers (lora.bnb.Linear4bit over a bitsandbytes
    Linear4bit) through fastpeft.qlora_linear.

    Patches in place and returns `model`. Outputs and gradients match PEFT's; parameters, state dict,
    save_pretrained and load_adapter are unchanged. Layers or adapters fastpeft cannot fuse stay on PEFT's
    path, named in one warning. backend: as for fastpeft.lora_linear. Undo with unpatch_peft(model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module (a PEFT model), got {type(model).__name__}")
    if backend is not None:
        requested_backend(backend)  # a bad name fails here, not at the first forward
    linear_cls, fused_cls, lora_layer_cls = _peft_linear_cls(), _fused_class(), _lora_layer_cls()
    skipped: dict[str, list[str]] = {}
    found = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, lora_layer_cls):
            continue
        found += 1
        cls = type(mod)
        if cls in (linear_cls, fused_cls):
            target, layer_reason, adapter_reason = fused_cls, _layer_reason, _adapter_reason
        elif _is_peft_linear4bit_cls(cls) or (cls.__name__ == _PATCHED_4BIT_NAME and cls.__module__ == __name__):
            peft_cls = cls if _is_peft_linear4bit_cls(cls) else cls.__bases__[0]
            target, layer_reason, adapter_reason = _fused_4bit_class(peft_cls), _layer_reason_4bit, _adapter_reason_4bit
        else:
            skipped.setdefault(f"LoRA layer {type(mod).__name__} on a "
                               f"{type(mod.get_base_layer()).__name__} base", []).append(name)
            continue
        reason = layer_reason(mod)
        if reason is not None:
            skipped.setdefault(reason, []).append(name)
            continue
        for a in mod.lora_A:
            reason = adapter_reason(mod, a, backend)
            if reason is not None:
                skipped.setdefault(f"adapter {a!r}: {reason}", []).append(name)
                _warned.add(("adapter", a, reason))  # named below: no second warning at forward time
        mod._fastpeft_backend = backend
        mod._fastpeft_name = name
        mod.__class__ = target
    if not found:
        raise ValueError("model: expected a PEFT model with LoRA layers (peft.get_peft_model with a LoraConfig), "
                         f"found no peft LoraLayer in {type(model).__name__}")
    if skipped:
        lines = [f"  {reason}: {len(names)} layer(s), e.g. {names[0]}" for reason, names in skipped.items()]
        warnings.warn("fastpeft.patch_peft: these stay on PEFT's path (not fused):\n" + "\n".join(lines), stacklevel=2)
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Restore PEFT's own forward on every layer patch_peft patched; returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for mod in model.modules():
        if is_patched(mod):  # the patched class's only base is PEFT's own class
            mod.__class__ = type(mod).__bases__[0]
            for attr in ("_fastpeft_backend", "_fastpeft_name", "_fastpeft_ok", "_fastpeft_cache",
                         "_fastpeft_dora_cache", "_fastpeft_q4_sig"):
                mod.__dict__.pop(attr, None)
    return model


def is_patched(module: nn.Module) -> bool:
    """True if `module` (a layer) was patched by patch_peft and not unpatched."""
    return type(module).__name__ in (_PATCHED_NAME, _PATCHED_4BIT_NAME) and type(module).__module__ == __name__


__all__ = ["patch_peft", "unpatch_peft", "is_patched"]
