"""fastpeft.bottleneck_adapter: y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu) with fused kernels.

A series adapter (Houlsby, Pfeiffer) has r = x: the adapter wraps the sub-layer's output h. A parallel
adapter (He et al.) takes the sub-layer's input x and adds to its output r. Backends: "triton"
(kernels/adapter.py) and "torch" (adapter_torch.py), the same decomposition; saved for backward are x
itself (the caller's tensor) and the fp32 bottleneck pre-activation Z [M, A], never another [M, D] tensor.

Eager calls run BottleneckAdapterFunction. Under torch.compile, bottleneck_adapter_traced calls the
torch.library ops torch.ops.fastpeft.bottleneck_adapter_fwd/bwd, which adapter_custom_op.py registers
(importing this module, never imported by it; fastpeft/__init__.py imports both).
"""
from __future__ import annotations

import torch

from .._backend import requested_backend, resolve_backend
from .._checks import (
    check_finite_number, check_finite_number_traceable, check_float_dtype, check_same_device, check_tensor,
)
from ..limits import ADAPTER_MAX_BOTTLENECK_TRITON as MAX_TRITON_BOTTLENECK  # the one limit: fastpeft/limits.py
from .adapter_torch import ACTIVATIONS, adapter_bwd_torch, adapter_fwd_torch
from .call_cache import CallCache, cacheable, tensor_key
from .shapes import as_rows

DOUBLE_BACKWARD_MESSAGE = (
    "bottleneck_adapter: double backward (create_graph=True, e.g. a gradient penalty) is not supported: "
    "the fused backward is not differentiable; use torch.func or an eager adapter for higher-order gradients")


def resolve_adapter_backend(backend: str | None, device: torch.device, bottleneck: int) -> str:
    """The backend that runs an adapter of this bottleneck width on `device` (see fastpeft._backend)."""
    reason = None if bottleneck <= MAX_TRITON_BOTTLENECK else \
        f"bottleneck={bottleneck} exceeds the Triton kernels' maximum {MAX_TRITON_BOTTLENECK}"
    return resolve_backend(backend, device, triton_ok=reason)


def _impl(backend: str):
    if backend == "triton":
        from ..kernels import adapter as k

        return k.adapter_fwd, k.adapter_bwd
    return adapter_fwd_torch, adapter_bwd_torch


def _forward(backend, x, residual, down_w, down_b, up_w, up_b, scaling, activation, store_z):
    """(y, Z): y is allocated here in x's shape and the backend writes it through a 2-D view, so the tensor
    handed to the caller is not a view (autograd forbids in-place edits of views made inside a Function)."""
    fwd, _ = _impl(backend)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _, z = fwd(as_rows(x), None if residual is None else as_rows(residual), down_w, down_b, up_w, up_b,
               scaling, activation, store_z, out=y.view(-1, x.shape[-1]))
    return y, z


class BottleneckAdapterFunction(torch.autograd.Function):
    """Autograd Function of the fused adapter. Use fastpeft.bottleneck_adapter, which validates inputs."""

    @staticmethod
    def forward(ctx, x, residual, down_w, down_b, up_w, up_b, scaling, activation, backend):
        need = ctx.needs_input_grad
        store_z = any(need[i] for i in (0, 2, 3, 4, 5))
        y, z = _forward(backend, x, residual, down_w, down_b, up_w, up_b, scaling, activation, store_z)
        # the output is not saved: backward needs only x, Z and the weights, so users may edit y in place
        ctx.save_for_backward(x, z, down_w, up_w)
        ctx.scaling, ctx.activation, ctx.backend = scaling, activation, backend
        ctx.series = residual is None
        ctx.bias_dtypes = (None if down_b is None else down_b.dtype, None if up_b is None else up_b.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: this backward is not itself differentiable
            raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)
        x, z, down_w, up_w = ctx.saved_tensors
        need_x, need_r, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:6]
        need_dw = need_wd or need_bd or need_wu or need_bu
        dx = dr = dwd = dbd = dwu = dbu = None
        if need_r:
            dr = dy
        if need_x or need_dw:
            _, bwd = _impl(ctx.backend)
            dx, dwd, dbd, dwu, dbu = bwd(as_rows(dy), as_rows(x), z, down_w, up_w, ctx.scaling, ctx.activation,
                                         ctx.series, need_x, need_dw)
            if dx is not None:
                dx = dx.view(x.shape)
        bd_dt, bu_dt = ctx.bias_dtypes
        return (dx, dr,
                dwd.to(down_w.dtype) if need_wd else None, dbd.to(bd_dt) if need_bd else None,
                dwu.to(up_w.dtype) if need_wu else None, dbu.to(bu_dt) if need_bu else None,
                None, None, None)


def check_adapter_inputs(h, down_w, down_b, up_w, up_b, scaling, activation, residual=None) -> float:
    """Validate the arguments of bottleneck_adapter; returns scaling as a float."""
    check_adapter_tensors(h, down_w, down_b, up_w, up_b, activation, residual)
    return check_finite_number("scaling", scaling)


def check_adapter_tensors(h, down_w, down_b, up_w, up_b, activation, residual=None) -> None:
    """Shapes, devices and dtypes of bottleneck_adapter's tensors, and the activation name (traceable)."""
    check_tensor("h", h)
    check_tensor("down_w", down_w, 2)
    check_tensor("up_w", up_w, 2)
    if down_b is not None:
        check_tensor("down_b", down_b, 1)
    if up_b is not None:
        check_tensor("up_b", up_b, 1)
    if residual is not None:
        check_tensor("residual", residual)
    if h.dim() < 1:
        raise ValueError("h: expected a tensor of shape [..., d_model], got a 0-D tensor")
    a, d = down_w.shape
    if a < 1 or d < 1:
        raise ValueError(f"down_w: expected shape [bottleneck, d_model] with bottleneck >= 1 and d_model >= 1, "
                         f"got {tuple(down_w.shape)}")
    if h.shape[-1] != d:
        raise ValueError(f"h: expected last dimension {d} (down_w is [bottleneck, d_model] = {list(down_w.shape)}), "
                         f"got shape {tuple(h.shape)}")
    if tuple(up_w.shape) != (d, a):
        raise ValueError(f"up_w: expected shape [{d}, {a}] ([d_model, bottleneck]), got {tuple(up_w.shape)}")
    if down_b is not None and tuple(down_b.shape) != (a,):
        raise ValueError(f"down_b: expected shape [{a}], got {tuple(down_b.shape)}")
    if up_b is not None and tuple(up_b.shape) != (d,):
        raise ValueError(f"up_b: expected shape [{d}], got {tuple(up_b.shape)}")
    if residual is not None and residual.shape != h.shape:
        raise ValueError(f"residual: expected shape {tuple(h.shape)} (the shape of h), got {tuple(residual.shape)}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    check_same_device(h=h, down_w=down_w, down_b=down_b, up_w=up_w, up_b=up_b, residual=residual)
    check_float_dtype("h", h)
    if residual is not None and residual.dtype != h.dtype:
        raise TypeError(f"residual: expected dtype {h.dtype} (the dtype of h), got {residual.dtype}")
    if down_w.dtype not in (h.dtype, torch.float32):
        raise TypeError(f"down_w: expected dtype {h.dtype} (the dtype of h) or torch.float32, got {down_w.dtype}")
    for name, t in (("up_w", up_w), ("down_b", down_b), ("up_b", up_b)):
        if t is not None and t.dtype != down_w.dtype:
            raise TypeError(f"{name}: expected dtype {down_w.dtype} (the dtype of down_w), got {t.dtype}")


def bottleneck_adapter(h, down_w, down_b, up_w, up_b, scaling=1.0, activation="gelu", *, residual=None, backend=None):
    """Bottleneck adapter: residual + scaling·(act(h·down_wᵀ + down_b)·up_wᵀ + up_b), residual = h by default.

    h [..., d] (fp32, fp16 or bf16); down_w [a, d], up_w [d, a], down_b [a], up_b [d] (biases may be None)
    in h's dtype or all fp32 (computed in h's dtype with fp32 accumulation; gradients come back
    in the weights' dtype). activation: "relu", "gelu" (erf), "gelu_tanh" or "silu".
    residual: the tensor the adapter's output is added to; None for a series adapter (h + adapter(h)),
    the sub-layer's output for a parallel one (the gradient of h then excludes the skip path).
    backend: "auto" (default, or $FASTPEFT_BACKEND), "triton" or "torch".
    Every tensor (and the gradient of the output) may come at any strides: sliced, transposed, expanded
    (stride 0), offset views; leading dims of h that no single stride spans are copied once. The output is a
    new tensor of h's shape that may be modified in place. Double backward raises NotImplementedError.
    """
    if torch.compiler.is_compiling():  # traced: the torch.library ops, no graph break
        return bottleneck_adapter_traced(h, down_w, down_b, up_w, up_b, scaling, activation, residual, backend)
    scaling = check_adapter_inputs(h, down_w, down_b, up_w, up_b, scaling, activation, residual)
    name = resolve_adapter_backend(backend, h.device, down_w.shape[0])
    return _run(name, h, down_w, down_b, up_w, up_b, scaling, activation, residual)


def _run(name, h, down_w, down_b, up_w, up_b, scaling, activation, residual):
    tensors = (h, residual, down_w, down_b, up_w, up_b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return BottleneckAdapterFunction.apply(h, residual, down_w, down_b, up_w, up_b, scaling, activation, name)
    return _forward(name, h, residual, down_w, down_b, up_w, up_b, scaling, activation, False)[0]


def bottleneck_adapter_cached(cache: CallCache, h, down_w, down_b, up_w, up_b, scaling=1.0, activation="gelu", *,
                              residual=None, backend=None):
    """fastpeft.bottleneck_adapter with its checks and backend choice cached in `cache` (ops/call_cache.py): what
    BottleneckAdapter calls. residual's shape follows h's, so it is compared on every call."""
    if not cacheable(h) or (residual is not None and (type(residual) is not torch.Tensor or residual.shape != h.shape)):
        return bottleneck_adapter(h, down_w, down_b, up_w, up_b, scaling, activation, residual=residual,
                                  backend=backend)
    key = (h.dtype, h.device, h.shape[-1], tensor_key(down_w), tensor_key(down_b), tensor_key(up_w),
           tensor_key(up_b), None if residual is None else (residual.dtype, residual.device), scaling, activation,
           backend)
    if key != cache.key:
        cache.key = None
        checked = check_adapter_inputs(h, down_w, down_b, up_w, up_b, scaling, activation, residual)
        cache.plan = (resolve_adapter_backend(backend, h.device, down_w.shape[0]), checked)
        cache.key = key
    name, scaling = cache.plan
    return _run(name, h, down_w, down_b, up_w, up_b, scaling, activation, residual)


def bottleneck_adapter_traced(h, down_w, down_b, up_w, up_b, scaling, activation, residual=None, backend=None):
    """fastpeft.bottleneck_adapter through the torch.library ops (adapter_custom_op.py): what a compiled graph
    calls. The same checks; the backend is resolved by the op at run time (a bad name fails while tracing)."""
    check_adapter_tensors(h, down_w, down_b, up_w, up_b, activation, residual)
    scaling = check_finite_number_traceable("scaling", scaling)
    if backend is not None:
        requested_backend(backend)
    # Z is stored only when a gradient that needs it is wanted, as BottleneckAdapterFunction does
    uses_z = (h, down_w, down_b, up_w, up_b)  # every input but the residual, whose gradient is dY itself
    store_z = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in uses_z)
    y, _ = torch.ops.fastpeft.bottleneck_adapter_fwd(h, residual, down_w, down_b, up_w, up_b, scaling, activation,
                                                     store_z, backend or "")
    return y


__all__ = ["bottleneck_adapter", "bottleneck_adapter_cached", "BottleneckAdapterFunction", "bottleneck_adapter_traced", "check_adapter_inputs",
           "check_adapter_tensors", "resolve_adapter_backend", "ACTIVATIONS"]
