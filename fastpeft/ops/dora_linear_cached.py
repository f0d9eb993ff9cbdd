"""The per-layer hot path of the DoRA linear: validate once, and keep ‖w_i‖² of the frozen W0 between calls.

LoRALinear(use_dora=True) and patch_peft's DoRA layers call dora_linear_cached with a DoRACallCache kept on the
layer. As lora_linear_cached does for LoRA, the first call and any call whose signature changes (a dtype, device or
shape of x or of a parameter, the scaling, p, the backend asked for) runs fastpeft.dora_linear's checks and backend
choice; later calls go straight to the autograd Function or the backend's forward.

The row norms ‖w_i‖² of W0 (fp32 [out]) are cached too, keyed on W0's identity, version counter, data pointer,
dtype, device and shape: anything that writes W0 (merge/unmerge, load_state_dict, an optimizer step on a W0 made
trainable, any in-place op) bumps its version, and replacing it (param.data = ..., module.to()) changes its
identity or pointer, so they are recomputed then and only then (one read of W0). Everything else of the norm,
A·W0ᵀ and A·Aᵀ, changes every training step and is recomputed per call (ops/dora_linear_torch.py `dora_norm`).

Under torch.compile, under autocast and for tensor subclasses this defers to fastpeft.dora_linear (via
dora_linear_amp), which checks every call and computes ‖w_i‖² inside the op.
"""
from __future__ import annotations

import torch

from ..dropout import draw_seed
from .dora_linear import check_dora_inputs, dora_linear_amp, dora_linear_checked, resolve_dora_backend
from .dora_linear_torch import weight_sq_norm
from .lora_linear_cached import call_signature

_UNSET = object()


class DoRACallCache:
    """The validated signature of one layer's last call, its backend, and ‖w_i‖² of W0 with the key it was computed
    for. Not part of the layer's state: a copy of the layer starts with an empty cache."""

    __slots__ = ("key", "sig", "backend", "scaling", "p", "w_key", "w_sq")

    def __init__(self):
        self.key = self.sig = self.backend = self.w_key = self.w_sq = None
        self.scaling, self.p = 1.0, 0.0

    def clear(self) -> None:
        self.key = self.sig = self.w_key = self.w_sq = None

    def __deepcopy__(self, memo):
        return DoRACallCache()

    def __reduce__(self):  # pickles as a fresh cache: the keys refer to this process's tensors
        return (DoRACallCache, ())


def weight_key(weight: torch.Tensor) -> tuple:
    """What ‖w_i‖² of `weight` depends on: identity, version counter, storage pointer, dtype, device, shape."""
    return (id(weight), weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.shape)


def cached_weight_sq_norm(cache: DoRACallCache, weight: torch.Tensor) -> torch.Tensor:
    """‖w_i‖² of W0 [out] in fp32, from the cache while W0 is unchanged (see the module docstring)."""
    try:
        key = weight_key(weight)
    except RuntimeError:  # an inference-mode tensor has no version counter: nothing to key on
        return weight_sq_norm(weight.detach())
    if cache.w_key != key:
        cache.w_key = None
        cache.w_sq = weight_sq_norm(weight.detach())
        cache.w_key = key
    return cache.w_sq


def dora_linear_cached(cache: DoRACallCache, x, weight, lora_a, lora_b, magnitude, scaling, bias=None,
                       dropout_p=0.0, training=True, backend=None, *, key=_UNSET):
    """fastpeft.dora_linear (honouring autocast) with the checks, the backend choice and ‖w_i‖² cached in `cache`."""
    if key is _UNSET:
        key = call_signature(x, weight, lora_a, lora_b, bias, scaling, dropout_p, backend)
    if key is None:
        return dora_linear_amp(x, weight, lora_a, lora_b, magnitude, scaling, bias, dropout_p, training,
                               backend=backend)
    sig, key = key, (key, magnitude.shape, magnitude.dtype, magnitude.device)
    if key != cache.key:
        cache.key = cache.sig = None  # a failure below leaves the cache empty
        cache.scaling, cache.p = check_dora_inputs(x, weight, lora_a, lora_b, magnitude, bias, scaling, dropout_p)
        cache.backend = resolve_dora_backend(backend, x.device, lora_a.shape[0])
        cache.key, cache.sig = key, sig  # sig: call_signature()'s part, which patch_peft compares
    p = cache.p if training else 0.0
    seed = draw_seed(x.device) if p > 0 else 0  # a device tensor inside CUDA graph capture (see draw_seed)
    return dora_linear_checked(x, weight, lora_a, lora_b, magnitude, cache.scaling, bias, p, seed, cache.backend,
                               cached_weight_sq_norm(cache, weight))


__all__ = ["DoRACallCache", "dora_linear_cached", "cached_weight_sq_norm", "weight_key"]
