"""torch.library registration of the QLoRA linear, so that torch.compile(fullgraph=True) traces it.

"fastpeft::qlora_linear_fwd" / "fastpeft::qlora_linear_bwd" take the 4-bit weight as its plain tensors (packed
codes, absmax, code table, and with double quantization the nested absmax, code and offset) plus its sizes,
quant type and original dtype, rebuild the Quant4 and call the backend's passes; fake implementations for
tracing and an autograd formula as for fastpeft::lora_linear_*. fastpeft.qlora_linear calls them through
qlora_linear_traced (ops/qlora_linear.py) only while compiling; this module imports that one, never the reverse.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dropout import keep_threshold
from .lora_linear_custom_op import _check_scalars_at_run, _kernel_seed
from .qlora_linear import _impl, qlora_linear_traced, resolve_qlora_backend  # noqa: F401
from .qlora_linear_torch import Quant4, qlora_linear_bwd_torch, qlora_shrink_torch
from .shapes import as_rows, lead_rows


def _quant4(packed, absmax, code, absmax2, code2, offset, out_features, in_features, blocksize, blocksize2,
            quant_type, dtype) -> Quant4:
    return Quant4(packed, absmax, code, absmax2, code2, offset, out_features, in_features, blocksize, blocksize2,
                  quant_type, dtype)


@torch.library.custom_op("fastpeft::qlora_linear_fwd", mutates_args=())
def qlora_linear_fwd_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                        lora_a: torch.Tensor, lora_b: torch.Tensor, bias: Optional[torch.Tensor], scaling: float,
                        dropout_p: float, seed: Optional[torch.Tensor], out_features: int, blocksize: int,
                        blocksize2: int, quant_type: str, wdtype: torch.dtype,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, out], S [M, r]) on the rows of x; inputs already validated."""
    _check_scalars_at_run(scaling, dropout_p)
    x2 = as_rows(x)
    q = _quant4(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[-1], blocksize, blocksize2,
                quant_type, wdtype)
    m, r = x2.shape[0], lora_a.shape[0]
    if m == 0 or out_features == 0:
        y = x.new_zeros((m, out_features))
        return (y + bias if bias is not None else y), x.new_zeros((m, r))
    fwd, _ = _impl(resolve_qlora_backend(backend or None, x.device, r))
    return fwd(x2, q, lora_a, lora_b, bias, scaling, dropout_p, _kernel_seed(seed, dropout_p, x),
               keep_threshold(dropout_p))


@qlora_linear_fwd_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, bias, scaling, dropout_p, seed, out_features,
      blocksize, blocksize2, quant_type, wdtype, backend):
    m = lead_rows(x)
    return x.new_empty((m, out_features)), x.new_empty((m, lora_a.shape[0]))


@torch.library.custom_op("fastpeft::qlora_linear_bwd", mutates_args=())
def qlora_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                        code: torch.Tensor, absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
                        offset: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor, s: torch.Tensor,
                        scaling: float, dropout_p: float, seed: Optional[torch.Tensor], out_features: int,
                        blocksize: int, blocksize2: int, quant_type: str, wdtype: torch.dtype, need_dx: bool,
                        need_da: bool, need_db: bool, need_dbias: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias); a gradient not needed comes back as an empty [0] tensor."""
    x2, dy2 = as_rows(x), as_rows(dy)
    q = _quant4(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[-1], blocksize, blocksize2,
                quant_type, wdtype)
    if x2.shape[0] == 0 or out_features == 0:
        dx, da, db = torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        dbias = dy.new_zeros(out_features)
    else:
        _, bwd = _impl(resolve_qlora_backend(backend or None, x.device, lora_a.shape[0]))
        dx, da, db, dbias = bwd(dy2, x2, q, lora_a, lora_b, s, scaling, dropout_p, _kernel_seed(seed, dropout_p, x),
                                keep_threshold(dropout_p), (need_dx, need_da, need_db, need_dbias))
        if dx is not None:
            dx = dx.view(x.shape)
    return (dx if need_dx else x.new_empty((0,)), da if need_da else lora_a.new_empty((0,)),
            db if need_db else lora_b.new_empty((0,)), dbias if need_dbias else dy.new_empty((0,)))


@qlora_linear_bwd_op.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, s, scaling, dropout_p, seed, out_features,
      blocksize, blocksize2, quant_type, wdtype, need_dx, need_da, need_db, need_dbias, backend):
    def maybe(need, like, shape):
        return like.new_empty(shape) if need else like.new_empty((0,))
    return (maybe(need_dx, x, x.shape), maybe(need_da, lora_a, lora_a.shape), maybe(need_db, lora_b, lora_b.shape),
            maybe(need_dbias, dy, (out_features,)))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, bias, scaling, dropout_p, seed, out_features,
     blocksize, blocksize2, quant_type, wdtype, backend) = inputs
    ctx.save_for_backward(x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, output[1], seed)
    ctx.args = (scaling, dropout_p, out_features, blocksize, blocksize2, quant_type, wdtype, backend)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _ds):
    x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, s, seed = ctx.saved_tensors
    scaling, dropout_p, out_features, blocksize, blocksize2, quant_type, wdtype, backend = ctx.args
    need_dx, need_da, need_db, need_dbias = (ctx.needs_input_grad[0], ctx.needs_input_grad[7],
                                             ctx.needs_input_grad[8], ctx.needs_input_grad[9] and ctx.has_bias)
    grads = [None] * 19
    if not (need_dx or need_da or need_db or need_dbias):
        return tuple(grads)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True, eagerly
        q = _quant4(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[-1], blocksize, blocksize2,
                    quant_type, wdtype)
        sd = _kernel_seed(seed, dropout_p, x)
        x2 = as_rows(x)
        s2 = qlora_shrink_torch(x2, lora_a, dropout_p, sd) if need_db else s
        dx, da, db, dbias = qlora_linear_bwd_torch(as_rows(dy), x2, q, lora_a, lora_b, s2, scaling, dropout_p, sd, 0,
                                                   (need_dx, need_da, need_db, need_dbias))
        dx = dx.view(x.shape) if dx is not None else None
    else:
        dx, da, db, dbias = torch.ops.fastpeft.qlora_linear_bwd(
            dy, x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, s, scaling, dropout_p, seed,
            out_features, blocksize, blocksize2, quant_type, wdtype, need_dx, need_da, need_db, need_dbias, backend)
    grads[0], grads[7], grads[8], grads[9] = (dx if need_dx else None, da if need_da else None,
                                              db if need_db else None, dbias if need_dbias else None)
    return tuple(grads)


torch.library.register_autograd("fastpeft::qlora_linear_fwd", _backward, setup_context=_setup_context)

__all__ = ["qlora_linear_fwd_op", "qlora_linear_bwd_op", "qlora_linear_traced"]
