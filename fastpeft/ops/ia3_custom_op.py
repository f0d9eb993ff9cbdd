"""torch.library registration of IA3 on a frozen linear, so that torch.compile(fullgraph=True) traces it.

"fastpeft::ia3_linear_fwd" and "fastpeft::ia3_linear_bwd" wrap the backend launchers (the same pair
IA3LinearFunction uses), with fake implementations for tracing and an autograd formula. Eager calls stay on
the Function: a custom op's dispatch costs microseconds. fastpeft.ia3_linear calls them, through
ia3_linear_traced (ops/ia3.py), only while torch.compiler.is_compiling(). The backend name travels as a string
("" for the default) and is resolved inside the ops at run time. This module imports ops/ia3.py, never the
reverse; fastpeft/__init__.py imports both.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ia3 import DOUBLE_BACKWARD_MESSAGE, _forward, _frozen_grads, _impl, resolve_ia3_backend
from .shapes import as_rows


@torch.library.custom_op("fastpeft::ia3_linear_fwd", mutates_args=())
def ia3_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                      mode: str, backend: str) -> torch.Tensor:
    """y [..., out] in x's dtype; inputs already validated."""
    return _forward(resolve_ia3_backend(backend or None, x.device), x, weight, bias, scale, mode)


@ia3_linear_fwd_op.register_fake
def _(x, weight, bias, scale, mode, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fastpeft::ia3_linear_bwd", mutates_args=())
def ia3_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      scale: torch.Tensor, mode: str, need_dx: bool, need_dl: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's shape and dtype, dl fp32 [len(scale)]); a gradient not needed comes back as an empty [0]
    tensor (a custom op's outputs may not alias each other)."""
    _, bwd = _impl(resolve_ia3_backend(backend or None, x.device))
    dx, dl = bwd(as_rows(dy), as_rows(x), weight, bias, scale, mode, need_dx, need_dl)
    return (dx.view(x.shape) if need_dx else x.new_empty((0,)),
            dl.float() if need_dl else x.new_empty((0,), dtype=torch.float32))


@ia3_linear_bwd_op.register_fake
def _(dy, x, weight, bias, scale, mode, need_dx, need_dl, backend):
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(scale.shape if need_dl else (0,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, mode, backend = inputs
    ctx.save_for_backward(x, weight, bias, scale)
    ctx.mode, ctx.backend = mode, backend


def _backward(ctx, dy):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True on an eager op call
        raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)
    x, weight, bias, scale = ctx.saved_tensors
    need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    dx = dl = dw = db = None
    if need_x or need_l:
        dx, dl = torch.ops.fastpeft.ia3_linear_bwd(dy, x, weight, bias, scale, ctx.mode, need_x, need_l, ctx.backend)
        dx = dx if need_x else None
        dl = dl.to(scale.dtype) if need_l else None
    if need_w or need_b:
        dw, db = _frozen_grads(as_rows(dy), as_rows(x), weight, bias, scale, ctx.mode, need_w, need_b)
    return dx, dw, db, dl, None, None


torch.library.register_autograd("fastpeft::ia3_linear_fwd", _backward, setup_context=_setup_context)


__all__ = ["ia3_linear_fwd_op", "ia3_linear_bwd_op"]
