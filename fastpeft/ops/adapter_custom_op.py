"""torch.library registration of the fused bottleneck adapter, so that torch.compile(fullgraph=True) traces it.

"fastpeft::bottleneck_adapter_fwd" and "fastpeft::bottleneck_adapter_bwd" wrap the backend launchers (the same
pair BottleneckAdapterFunction uses), with fake implementations for tracing and an autograd formula. Eager
calls stay on the Function: a custom op's dispatch costs microseconds. fastpeft.bottleneck_adapter calls them,
through bottleneck_adapter_traced (ops/adapter.py), only while torch.compiler.is_compiling(). The backend name
travels as a string ("" for the default) and is resolved inside the ops at run time. This module imports
ops/adapter.py, never the reverse; fastpeft/__init__.py imports both.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .adapter import DOUBLE_BACKWARD_MESSAGE, _forward, _impl, resolve_adapter_backend
from .shapes import as_rows, lead_rows


@torch.library.custom_op("fastpeft::bottleneck_adapter_fwd", mutates_args=())
def bottleneck_adapter_fwd_op(x: torch.Tensor, residual: Optional[torch.Tensor], down_w: torch.Tensor,
                              down_b: Optional[torch.Tensor], up_w: torch.Tensor, up_b: Optional[torch.Tensor],
                              scaling: float, activation: str, store_z: bool,
                              backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x's shape and dtype, Z [M, bottleneck] fp32 saved for backward, or an empty tensor when not
    store_z); inputs already validated."""
    if not math.isfinite(scaling):  # symbolic on the trace: checked there only for the first value
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    name = resolve_adapter_backend(backend or None, x.device, down_w.shape[0])
    y, z = _forward(name, x, residual, down_w, down_b, up_w, up_b, scaling, activation, store_z)
    return y, z if z is not None else x.new_empty((0,), dtype=torch.float32)


@bottleneck_adapter_fwd_op.register_fake
def _(x, residual, down_w, down_b, up_w, up_b, scaling, activation, store_z, backend):
    z_shape = (lead_rows(x), down_w.shape[0]) if store_z else (0,)
    return x.new_empty(x.shape), x.new_empty(z_shape, dtype=torch.float32)


@torch.library.custom_op("fastpeft::bottleneck_adapter_bwd", mutates_args=())
def bottleneck_adapter_bwd_op(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor, down_w: torch.Tensor,
                              up_w: torch.Tensor, scaling: float, activation: str, series: bool, need_dx: bool,
                              need_dw: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """(dx in x's dtype with dy added for a series adapter; dWd, dbd, dWu, dbu in fp32); a gradient not
    needed comes back as an empty [0] tensor (a custom op's outputs may not alias each other)."""
    _, bwd = _impl(resolve_adapter_backend(backend or None, x.device, down_w.shape[0]))
    dx, dwd, dbd, dwu, dbu = bwd(as_rows(dy), as_rows(x), z, down_w, up_w, scaling, activation, series,
                                 need_dx, need_dw)
    dx = dx.view(x.shape) if need_dx else x.new_empty((0,))
    if not need_dw:
        dwd, dbd, dwu, dbu = (x.new_empty((0,), dtype=torch.float32) for _ in range(4))
    return dx, dwd, dbd, dwu, dbu


@bottleneck_adapter_bwd_op.register_fake
def _(dy, x, z, down_w, up_w, scaling, activation, series, need_dx, need_dw, backend):
    a, d = down_w.shape
    f32 = (lambda *shape: x.new_empty(shape if need_dw else (0,), dtype=torch.float32))
    return (x.new_empty(x.shape if need_dx else (0,)), f32(a, d), f32(a), f32(d, a), f32(d))


def _setup_context(ctx, inputs, output):
    x, residual, down_w, down_b, up_w, up_b, scaling, activation, store_z, backend = inputs
    ctx.save_for_backward(x, output[1], down_w, up_w)
    ctx.scaling, ctx.activation, ctx.backend, ctx.series = scaling, activation, backend, residual is None
    ctx.bias_dtypes = (None if down_b is None else down_b.dtype, None if up_b is None else up_b.dtype)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dz):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True on an eager op call
        raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)
    x, z, down_w, up_w = ctx.saved_tensors
    need_x, need_r, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:6]
    need_dw = need_wd or need_bd or need_wu or need_bu
    dx = dwd = dbd = dwu = dbu = None
    if need_x or need_dw:
        dx, dwd, dbd, dwu, dbu = torch.ops.fastpeft.bottleneck_adapter_bwd(
            dy, x, z, down_w, up_w, ctx.scaling, ctx.activation, ctx.series, need_x, need_dw, ctx.backend)
    bd_dt, bu_dt = ctx.bias_dtypes
    return (dx if need_x else None, dy if need_r else None,
            dwd.to(down_w.dtype) if need_wd else None, dbd.to(bd_dt) if need_bd else None,
            dwu.to(up_w.dtype) if need_wu else None, dbu.to(bu_dt) if need_bu else None,
            None, None, None, None)


torch.library.register_autograd("fastpeft::bottleneck_adapter_fwd", _backward, setup_context=_setup_context)


__all__ = ["bottleneck_adapter_fwd_op", "bottleneck_adapter_bwd_op"]
