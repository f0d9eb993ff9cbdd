"""The per-layer hot path of the LoRA linear: validate once, then call the backend directly.

LoRALinear.forward and patch_peft's forward call lora_linear_cached with a LoRACallCache kept on the layer.
The first call, and any call whose signature differs from the cached one, runs fastpeft.lora_linear's full
checks and backend resolution and caches the outcome; later calls compare the signature and go straight to
the autograd Function (training) or the backend's forward (no grad). The signature holds everything the
checks and the backend choice depend on: x's dtype, device and last dimension, and the shape, dtype and device
of every parameter, the scaling, p, and the backend asked for. A parameter replaced, moved, cast or resized
(module.to(), param.data = ..., load_state_dict into a new shape) changes it, so the checks run again; an
in-place update (an optimizer step) does not, and needs no check. $FASTPEFT_BACKEND is read when a layer's
signature is (re)validated, not on every call.

Under torch.compile, under autocast, and for inputs of other types this defers to fastpeft.lora_linear (via
lora_linear_amp), which does the same work every call.
"""
from __future__ import annotations

import torch

from ..autocast import lora_linear_amp
from ..dropout import check_dropout_mask, draw_seed, keep_threshold
from .call_cache import CallCache
from .lora_linear import (
    LoRALinearFunction, _impl, check_lora_inputs, check_mask_backend, cpu_autograd_node, resolve_lora_backend,
)

_is_compiling = torch.compiler.is_compiling
_autocast_on = torch.is_autocast_enabled
_AUTOCAST_TYPES = frozenset(("cuda", "cpu", "xpu", "mps", "hpu"))


class LoRACallCache(CallCache):
    """What the last validated call of one layer established: its signature, backend and forward launcher.

    Not part of the layer's state: a copy of the layer starts with an empty cache (see CallCache)."""

    __slots__ = ("backend", "fwd", "node", "thr", "scaling", "p", "packed")

    def __init__(self):
        super().__init__()
        self.backend = self.fwd = self.node = None
        self.thr, self.scaling, self.p, self.packed = 0, 1.0, 0.0, False


def call_signature(x, weight, lora_a, lora_b, bias, scaling, dropout_p, backend, dropout_mask="regenerate"):
    """The cache key of a call: what its checks and backend choice depend on; None where the cache does not apply
    (while torch.compile traces, under autocast, for a tensor subclass)."""
    if _is_compiling() or type(x) is not torch.Tensor:
        return None
    dev = x.device
    if dev.type in _AUTOCAST_TYPES and _autocast_on(dev.type):
        return None
    b = None if bias is None else (bias.shape, bias.dtype, bias.device)
    return (x.dtype, dev, x.shape[-1], weight.shape, weight.dtype, weight.device, lora_a.shape, lora_a.dtype,
            lora_a.device, lora_b.shape, lora_b.dtype, lora_b.device, b, scaling, dropout_p, backend, dropout_mask)


_UNSET = object()


def lora_linear_cached(cache: LoRACallCache, x, weight, lora_a, lora_b, scaling, bias=None, dropout_p=0.0,
                       training=True, backend=None, *, key=_UNSET, dropout_mask="regenerate"):
    """fastpeft.lora_linear (honouring autocast) with the checks and backend choice cached in `cache`;
    `key`: call_signature() of these arguments when the caller has it already."""
    if key is _UNSET:
        key = call_signature(x, weight, lora_a, lora_b, bias, scaling, dropout_p, backend, dropout_mask)
    if key is None:
        return lora_linear_amp(x, weight, lora_a, lora_b, scaling, bias=bias, dropout_p=dropout_p, training=training,
                               backend=backend, dropout_mask=dropout_mask)
    if key != cache.key:
        _validate(cache, key, x, weight, lora_a, lora_b, bias, scaling, dropout_p, backend, dropout_mask)
    scaling = cache.scaling  # as floats, checked
    p = cache.p if training else 0.0
    seed = draw_seed(x.device) if p > 0 else 0  # a device tensor inside CUDA graph capture (see draw_seed)
    if torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
                                    or weight.requires_grad or (bias is not None and bias.requires_grad)):
        node = cache.node
        # the whole layer as one C++ autograd node (CPU, torch backend), which keeps no packed mask
        if node is not None and type(seed) is int and not (cache.packed and p > 0):
            y2 = node(x, weight, lora_a, lora_b, bias, scaling, p, seed, cache.thr if p > 0 else 0)
        else:
            y2 = LoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, scaling, p, seed, cache.backend, cache.packed)
    else:  # inference: the backend's forward without autograd's bookkeeping
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0 or weight.shape[0] == 0:  # nothing to compute; no kernel is launched on an empty grid
            y2 = x2.new_empty((x2.shape[0], weight.shape[0]))
        else:
            y2 = cache.fwd(x2, weight, lora_a, lora_b, bias, scaling, p, seed, cache.thr if p > 0 else 0)[0]
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], y2.shape[1])


def _validate(cache, key, x, weight, lora_a, lora_b, bias, scaling, dropout_p, backend, dropout_mask) -> None:
    scaling, dropout_p = check_lora_inputs(x, weight, lora_a, lora_b, bias, scaling, dropout_p)
    check_dropout_mask(dropout_mask)
    name = resolve_lora_backend(backend, x.device, lora_a.shape[0])
    check_mask_backend(dropout_mask, name)
    cache.key = None  # a failure below leaves the cache empty
    cache.backend, cache.fwd = name, _impl(name)[0]
    cache.node = cpu_autograd_node(name, x.device)
    cache.thr, cache.scaling, cache.p = keep_threshold(dropout_p), scaling, dropout_p
    cache.packed = dropout_mask == "packed"
    cache.key = key


__all__ = ["LoRACallCache", "call_signature", "lora_linear_cached"]
