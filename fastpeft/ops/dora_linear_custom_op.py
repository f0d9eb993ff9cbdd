"""torch.library registration of the DoRA linear, so that torch.compile(fullgraph=True) traces it.

"fastpeft::dora_linear_fwd" and "fastpeft::dora_linear_bwd" wrap the backends of ops/dora_linear.py, with fake
implementations and an autograd formula; fastpeft.dora_linear calls them through dora_linear_traced only while
torch.compiler.is_compiling(). The norm ‖W0 + s·B·A‖ and g = m/‖·‖ are computed inside the forward op (outputs,
not differentiable); the magnitude's gradient comes from the backward op. This module imports ops/dora_linear.py,
never the reverse; fastpeft/__init__.py imports it. Seeds as in lora_linear_custom_op.py.
"""

from typing import Optional

import torch

from .dora_linear import _forward, dora_backward, resolve_dora_backend
from .dora_linear import dora_linear_traced  # noqa: F401  (the entry point of these ops, importable from here too)
from .lora_linear_custom_op import _check_scalars_at_run, _kernel_seed
from .shapes import as_rows, lead_rows


def _resolved(backend: str, x: torch.Tensor, r: int) -> str:
    return resolve_dora_backend(backend or None, x.device, r)


@torch.library.custom_op("fastpeft::dora_linear_fwd", mutates_args=())
def dora_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       magnitude: torch.Tensor, bias: Optional[torch.Tensor], weight_norm_sq: Optional[torch.Tensor],
                       scaling: float, dropout_p: float, seed: Optional[torch.Tensor], backend: str,
                       save_pre: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [M, out] as rows, S [M, r], V [M, out] (or [0] without save_pre), g [out], norm [out]); inputs validated."""
    _check_scalars_at_run(scaling, dropout_p)
    x2 = as_rows(x)
    name = _resolved(backend, x, lora_a.shape[0])
    y2, s, v, g, norm = _forward(x2, weight, lora_a, lora_b, magnitude, bias, weight_norm_sq, scaling, dropout_p,
                                 _kernel_seed(seed, dropout_p, x), name, save_pre)
    return y2, s, (v if save_pre else x.new_empty((0,))), g, norm


@dora_linear_fwd_op.register_fake
def _(x, weight, lora_a, lora_b, magnitude, bias, weight_norm_sq, scaling, dropout_p, seed, backend, save_pre):
    m, n = lead_rows(x), weight.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (x.new_empty((m, n)), x.new_empty((m, lora_a.shape[0])), x.new_empty((m, n) if save_pre else (0,)),
            torch.empty((n,), **f32), torch.empty((n,), **f32))


@torch.library.custom_op("fastpeft::dora_linear_bwd", mutates_args=())
def dora_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, s: torch.Tensor, v: torch.Tensor, g: torch.Tensor, norm: torch.Tensor,
                       scaling: float, dropout_p: float, seed: Optional[torch.Tensor], need_dx: bool, need_dw: bool,
                       need_da: bool, need_db: bool, need_dm: bool, need_dbias: bool, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, dA, dB, dm fp32, dbias fp32); a gradient not needed comes back as an empty [0] tensor."""
    x2 = as_rows(x)
    name = _resolved(backend, x, lora_a.shape[0])
    dx, dw, da, db, dm, dbias = dora_backward(as_rows(dy), x2, weight, lora_a, lora_b, s, v, g, norm, scaling,
                                              dropout_p, _kernel_seed(seed, dropout_p, x), name,
                                              (need_dx, need_dw, need_da, need_db, need_dm, need_dbias))
    if dx is not None:
        dx = dx.view(x.shape)
    # a custom op's outputs may not alias each other: a fresh empty tensor for each gradient not needed
    return (dx if need_dx else x.new_empty((0,)), dw if need_dw else weight.new_empty((0,)),
            da if need_da else lora_a.new_empty((0,)), db if need_db else lora_b.new_empty((0,)),
            dm if need_dm else g.new_empty((0,)), dbias if need_dbias else g.new_empty((0,)))


@dora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, s, v, g, norm, scaling, dropout_p, seed, need_dx, need_dw, need_da, need_db,
      need_dm, need_dbias, backend):
    def maybe(need, like, shape, dtype=None):
        return like.new_empty(shape if need else (0,), dtype=dtype or like.dtype)
    return (maybe(need_dx, x, x.shape), maybe(need_dw, weight, weight.shape), maybe(need_da, lora_a, lora_a.shape),
            maybe(need_db, lora_b, lora_b.shape), maybe(need_dm, g, g.shape), maybe(need_dbias, g, g.shape))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, magnitude, bias, w_sq, scaling, dropout_p, seed, backend, save_pre = inputs
    _, s, v, g, norm = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, v, g, norm, seed)  # seed: a tensor or None
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.has_bias, ctx.m_dtype = bias is not None, magnitude.dtype
    ctx.b_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(s, v, g, norm)


def _backward(ctx, dy, _ds, _dv, _dg, _dnorm):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        from .dora_linear import DOUBLE_BACKWARD_MESSAGE

        raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)
    x, weight, lora_a, lora_b, s, v, g, norm, seed = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db, need_dm, need_dbias = ctx.needs_input_grad[:6]
    need_dbias = need_dbias and ctx.has_bias
    needs = (need_dx, need_dw, need_da, need_db, need_dm, need_dbias)
    grads = [None] * 6
    if any(needs):
        out = torch.ops.fastpeft.dora_linear_bwd(dy, x, weight, lora_a, lora_b, s, v, g, norm, ctx.scaling,
                                                 ctx.dropout_p, seed, *needs, ctx.backend)
        grads = [t if need else None for t, need in zip(out, needs)]
    if grads[4] is not None:
        grads[4] = grads[4].to(ctx.m_dtype)
    if grads[5] is not None:
        grads[5] = grads[5].to(ctx.b_dtype)
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd("fastpeft::dora_linear_fwd", _backward, setup_context=_setup_context)

__all__ = ["dora_linear_fwd_op", "dora_linear_bwd_op", "dora_linear_traced"]
