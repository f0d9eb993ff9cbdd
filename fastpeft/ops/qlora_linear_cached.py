"""The per-layer hot path of the QLoRA linear: validate once, then call the backend directly.

LoRALinear over a bitsandbytes Linear4bit and patch_peft's forward of PEFT's lora.bnb.Linear4bit call
qlora_linear_cached with a QLoRACallCache kept on the layer. The first call, and any call whose signature differs
from the cached one, builds the layer's Quant4 (fastpeft.ops.qlora_linear.quant4: every check of the packed
weight and its QuantState), runs check_qlora_inputs and resolves the backend, and caches the outcome; later calls
compare the signature and go straight to qlora_linear_q4. The signature holds what those depend on: x's dtype,
device and last dimension, the packed weight's storage pointer, dtype and device and id() of its QuantState (a
weight re-quantized, replaced, moved or loaded gets a new one), shape, dtype and device of lora_a, lora_b and the
bias, the scaling, p and the backend asked for. An in-place update of the adapters (an optimizer step) does not
change it.

Like bitsandbytes' Linear4bit.forward, x is cast to the layer's compute dtype (set from the first input when the
layer has none, as bitsandbytes does) and the output is returned in x's dtype; the bias is used in the compute
dtype (bitsandbytes casts it in place; here a cast copy, so the layer's bias is left as it is).
Under torch.compile and for tensor subclasses this defers to fastpeft.qlora_linear, which checks every call;
under autocast the call runs with autocast off (bitsandbytes computes in the compute dtype either way).
"""
from __future__ import annotations

import torch

from .call_cache import CallCache, cacheable, tensor_key
from .qlora_linear import check_qlora_inputs, qlora_linear, qlora_linear_q4, quant4, resolve_qlora_backend

_AUTOCAST_TYPES = frozenset(("cuda", "cpu", "xpu", "mps", "hpu"))


class QLoRACallCache(CallCache):
    """What the last validated call of one 4-bit layer established: its signature, Quant4, backend and settings.

    Not part of the layer's state: a copy of the layer starts with an empty cache (see CallCache)."""

    __slots__ = ("q", "backend", "scaling", "p")

    def __init__(self):
        super().__init__()
        self.q = self.backend = None
        self.scaling, self.p = 1.0, 0.0


def compute_dtype(base, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit computes in for input x: its compute_dtype, set from the first input
    when the layer has none (Linear4bit.set_compute_type, called as Linear4bit.forward calls it), else x's dtype."""
    if not getattr(base, "compute_type_is_set", True) and hasattr(base, "set_compute_type"):
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dt = getattr(base, "compute_dtype", None)
    return x.dtype if dt is None else dt


def call_signature(x, weight, quant_state, lora_a, lora_b, bias, scaling, dropout_p, backend):
    """The cache key of a call (x already in the compute dtype); None where the cache does not apply."""
    if not cacheable(x):
        return None
    return (x.dtype, x.device, x.shape[-1], weight.data_ptr(), weight.dtype, weight.device, weight.shape,
            id(quant_state), tensor_key(lora_a), tensor_key(lora_b), tensor_key(bias), scaling, dropout_p, backend)


def qlora_linear_cached(cache: QLoRACallCache, x, weight, quant_state, lora_a, lora_b, scaling, bias=None,
                        dropout_p=0.0, training=True, backend=None, *, compute=None):
    """y = x·deq(W0)ᵀ + bias + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ, computed in `compute` (the layer's
    compute dtype; default x's dtype) and returned in x's dtype, with the checks and backend choice cached in `cache`."""
    inp_dtype = x.dtype
    if compute is not None and x.dtype != compute:
        x = x.to(compute)
    if bias is not None and bias.dtype != x.dtype and bias.dtype.is_floating_point:
        bias = bias.to(x.dtype)
    dev = x.device.type
    if dev in _AUTOCAST_TYPES and torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            y = qlora_linear(x, weight, quant_state, lora_a, lora_b, scaling, bias, dropout_p, training,
                             backend=backend)
        return y if y.dtype == inp_dtype else y.to(inp_dtype)
    key = call_signature(x, weight, quant_state, lora_a, lora_b, bias, scaling, dropout_p, backend)
    if key is None:
        y = qlora_linear(x, weight, quant_state, lora_a, lora_b, scaling, bias, dropout_p, training, backend=backend)
        return y if y.dtype == inp_dtype else y.to(inp_dtype)
    if key != cache.key:
        validate(cache, key, x, weight, quant_state, lora_a, lora_b, bias, scaling, dropout_p, backend)
    y = qlora_linear_q4(x, cache.q, lora_a, lora_b, cache.scaling, bias, cache.p if training else 0.0,
                        backend=cache.backend)
    return y if y.dtype == inp_dtype else y.to(inp_dtype)


def validate(cache, key, x, weight, quant_state, lora_a, lora_b, bias, scaling, dropout_p, backend) -> None:
    """Every check of the call (raising, with the cache left empty, on bad input); then caches the outcome."""
    cache.key = None
    q = quant4(weight, quant_state)
    scaling, dropout_p = check_qlora_inputs(x, q, lora_a, lora_b, bias, scaling, dropout_p)
    name = resolve_qlora_backend(backend, x.device, lora_a.shape[0])
    cache.q, cache.backend, cache.scaling, cache.p = q, name, scaling, dropout_p
    cache.key = key


__all__ = ["QLoRACallCache", "qlora_linear_cached", "compute_dtype", "call_signature"]
