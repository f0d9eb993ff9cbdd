"""torch.library registration of the gradient-free GaLore linear, so that torch.compile(fullgraph=True) traces it.

The backward has a side effect a graph cannot express: it accumulates the weight's projected gradient into the
layer's GaLoreLinearState (and on a refresh step computes a new basis, drawing random numbers), and returns no
weight gradient. So both halves are opaque ops:
- "fastpeft::galore_linear_fwd" (x, weight, bias, ref, dtype): y = x·Wᵀ + b, in `dtype` when autocast is on
  (galore_linear_traced reads autocast's dtype while tracing: inside the op autocast may no longer apply).
- "fastpeft::galore_linear_bwd" (dy, x, weight, ref, needs): dX and db as GaLoreLinearFunction computes them,
  and ref.state.accumulate(X, dY). Registered as an ordered effect, so the compiler neither drops it (its
  outputs may all be unused: only W needs a gradient) nor reorders it.
The state reaches the ops through its GaLoreStateRef (`state.op_ref`), a reference-type opaque object
(torch._library.opaque_object): Dynamo passes the layer's own handle in as a graph input, never a copy or a
constant. The state itself stays an ordinary object (a compiled optimizer step may read it). This uses
private torch APIs (opaque objects, effectful custom ops; present in torch 2.13): where they are missing,
SUPPORTED is False, no op is registered and a compiled GaLore layer raises a RuntimeError saying why.
Eager calls stay on GaLoreLinearFunction; fastpeft.ops.galore_linear.galore_linear calls galore_linear_traced
only while torch.compiler.is_compiling(). This module imports no other fastpeft op module.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .shapes import as_rows

try:  # private APIs: torch.compile support only where they exist
    from torch._library.effects import EffectType
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase as _RefBase
    UNSUPPORTED_REASON = None if hasattr(torch.library, "_register_effectful_op") else \
        f"this torch ({torch.__version__}) has no torch.library._register_effectful_op"
except ImportError as exc:
    _RefBase = object
    UNSUPPORTED_REASON = f"this torch ({torch.__version__}) has no opaque objects for custom ops ({exc})"
SUPPORTED = UNSUPPORTED_REASON is None
DOUBLE_BACKWARD_MESSAGE = (
    "galore_linear: double backward (create_graph=True, e.g. a gradient penalty) is not supported: the "
    "weight's gradient is consumed as its projection, which is not differentiable")


class GaLoreStateRef(_RefBase):
    """The handle by which a compiled graph passes a GaLoreLinearState to the ops (made by the state as
    `state.op_ref`; copies and pickles of the state carry their own)."""

    def __init__(self, state):
        self.state = state


def galore_linear_traced(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state) -> torch.Tensor:
    """fastpeft.ops.galore_linear.galore_linear inside a compiled graph: the same check, then the ops."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (weight is {tuple(weight.shape)}), "
                         f"got {tuple(x.shape)}")
    ref = getattr(state, "op_ref", None)
    if not SUPPORTED or not isinstance(ref, GaLoreStateRef):
        reason = UNSUPPORTED_REASON or "the layer's GaLoreLinearState has no GaLoreStateRef (op_ref)"
        raise RuntimeError(f"galore_linear cannot be compiled: {reason}; run the GaLore layers eagerly "
                           "(torch.compiler.disable) or compile without fullgraph=True")
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return torch.ops.fastpeft.galore_linear_fwd(x, weight, bias, ref, dtype)


def _register() -> None:
    register_opaque_type(GaLoreStateRef, typ="reference")

    @torch.library.custom_op("fastpeft::galore_linear_fwd", mutates_args=())
    def galore_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             ref: GaLoreStateRef, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """y [..., out]: F.linear as in GaLoreLinearFunction, in `dtype` (autocast's) when given."""
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        y = F.linear(x, weight, bias)
        # F.linear with a bias on [..., in] returns a view of its 2-D product: give the op's output its own
        # identity (the same memory, no copy)
        return torch.ops.aten._unsafe_view(y, y.shape) if y._is_view() else y

    @galore_linear_fwd_op.register_fake
    def _(x, weight, bias, ref, dtype):
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype if dtype is not None else x.dtype)

    @torch.library.custom_op("fastpeft::galore_linear_bwd", mutates_args=())
    def galore_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ref: GaLoreStateRef,
                             need_dx: bool, need_dbias: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx in x's shape and dtype, dbias in W's dtype), empty [0] when not needed; when need_dw, W's
        projected gradient goes to the state (GaLoreLinearFunction.backward's formulas)."""
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = dbias = None
        if need_dx:  # a no-op cast without autocast; under it (16-bit dY, fp32 W) an [out, in] copy, as eagerly
            dx = (dy2 @ weight.to(dy2.dtype)).to(x.dtype).view(x.shape)
        if need_dbias:
            dbias = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
        if need_dw:
            x2 = as_rows(x)
            ref.state.accumulate(x2.to(dy2.dtype) if x2.dtype != dy2.dtype else x2, dy2)
        return (dx if need_dx else x.new_empty((0,)), dbias if need_dbias else weight.new_empty((0,)))

    @galore_linear_bwd_op.register_fake
    def _(dy, x, weight, ref, need_dx, need_dbias, need_dw):
        return (x.new_empty(x.shape if need_dx else (0,)), weight.new_empty((weight.shape[0],) if need_dbias else (0,)))

    # the accumulation is the point of the backward op: never dead code, never reordered
    torch.library._register_effectful_op("fastpeft::galore_linear_bwd", EffectType.ORDERED)

    def setup_context(ctx, inputs, output):
        x, weight, bias, ref, dtype = inputs
        ctx.save_for_backward(x, weight)
        ctx.ref, ctx.has_bias = ref, bias is not None

    def backward(ctx, dy):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True, eager op call
            raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_dbias = ctx.needs_input_grad[:3]
        need_dbias = need_dbias and ctx.has_bias
        dx = dbias = None
        if need_dx or need_dw or need_dbias:
            dx, dbias = torch.ops.fastpeft.galore_linear_bwd(dy, x, weight, ctx.ref, need_dx, need_dbias, need_dw)
        # no gradient for W: its projection went to the state (fastpeft.galore)
        return (dx if need_dx else None), None, (dbias if need_dbias else None), None, None

    torch.library.register_autograd("fastpeft::galore_linear_fwd", backward, setup_context=setup_context)


if SUPPORTED:
    try:  # private APIs change between torch releases: a failed registration must not break `import fastpeft`
        _register()
    except Exception as exc:  # noqa: BLE001 - any failure means: no compiled GaLore on this torch, say why
        SUPPORTED = False
        UNSUPPORTED_REASON = (f"registering the GaLore ops failed on this torch ({torch.__version__}): "
                              f"{type(exc).__name__}: {exc}")

__all__ = ["GaLoreStateRef", "galore_linear_traced", "SUPPORTED", "UNSUPPORTED_REASON"]
