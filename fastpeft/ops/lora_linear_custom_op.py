"""torch.library registration of the fused LoRA linear, so that torch.compile(fullgraph=True) traces it.

"fastpeft::lora_linear_fwd" and "fastpeft::lora_linear_bwd" wrap the backend launchers (the same (fwd, bwd)
pair LoRALinearFunction uses), with fake implementations for tracing and an autograd formula. Eager calls
stay on LoRALinearFunction: a custom op's dispatch costs microseconds that matter at decode.
fastpeft.lora_linear calls them, through lora_linear_traced (ops/lora_linear.py, where the seed's handling
is described), only while torch.compiler.is_compiling(). This module imports ops/lora_linear.py, never the
reverse: the ops are reached through torch.ops.fastpeft, and fastpeft/__init__.py imports this module.

dropout_mask="packed": the forward op also returns the keep-mask's bits ([M, ceil(in/8)] uint8; else an empty
[0] uint8 tensor), which the backward op takes as `mask`.

The seed is an optional 0-d int64 tensor (None without dropout). The ops hand a seed on x's device to the
launchers and to the PyTorch twin as it is, to be read on the device (no host read: a CUDA graph replays it);
see `_kernel_seed` for a CPU seed with CUDA x.
"""

import math
from typing import Optional

import torch

from ..dropout import keep_threshold, packed_mask_shape
from .lora_linear import _differentiable_backward, _impl, check_mask_backend, resolve_lora_backend
from .lora_linear import lora_linear_traced  # noqa: F401  (the entry point of these ops, importable from here too)
from .shapes import as_rows, lead_rows


def _resolved(backend: str, x: torch.Tensor, r: int) -> str:
    return resolve_lora_backend(backend or None, x.device, r)  # the choice fastpeft.lora_linear makes eagerly


def _kernel_seed(seed: Optional[torch.Tensor], dropout_p: float, x: torch.Tensor):
    """The seed as the backends take it: 0 without dropout; a seed on x's device as it is (read on the device);
    a CPU seed for x on another device as an int, read on the host (CPU memory, so no GPU sync), except while
    a CUDA graph is captured: the graph would keep that one value for every replay."""
    if dropout_p == 0:
        return 0
    if seed is None or seed.dim() != 0 or seed.dtype != torch.int64:
        got = "None" if seed is None else f"shape {tuple(seed.shape)}, {seed.dtype}"
        raise ValueError(f"seed: expected a 0-d torch.int64 tensor when dropout_p > 0, got {got}")
    if seed.device == x.device:
        return seed
    if seed.device.type != "cpu":
        raise ValueError(f"seed: expected a tensor on the CPU or on {x.device} (x's device), got one on {seed.device}")
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"seed: a CPU seed tensor cannot be used inside CUDA graph capture (its value would be "
                           f"replayed unchanged); pass the seed on {x.device}, or pass none to draw one there")
    return int(seed)


@torch.library.custom_op("fastpeft::lora_linear_fwd", mutates_args=())
def lora_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       bias: Optional[torch.Tensor], scaling: float, dropout_p: float,
                       seed: Optional[torch.Tensor], backend: str,
                       dropout_mask: str = "regenerate") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [M, out] in x's dtype, the rows of x [..., in]; S [M, r] saved for backward; the packed keep bits with
    dropout_mask="packed" and dropout, else an empty uint8 tensor); inputs already validated.

    y comes back as rows, not viewed to x's leading shape: lora_linear_traced reshapes it outside the op, so
    no output is a view made inside the op's autograd Function (which in-place ops after it could not follow).
    """
    _check_scalars_at_run(scaling, dropout_p)
    x2 = as_rows(x)
    m, n, r = x2.shape[0], weight.shape[0], lora_a.shape[0]
    name = _resolved(backend, x, r)
    check_mask_backend(dropout_mask, name)
    packed = dropout_mask == "packed" and dropout_p > 0
    mask = x.new_empty(packed_mask_shape(m, x2.shape[1]) if packed else (0,), dtype=torch.uint8)
    if m == 0 or n == 0:  # nothing to compute; no kernel is launched on an empty grid
        return x.new_empty((m, n)), x.new_zeros((m, r)), mask
    fwd, _ = _impl(name)
    args = (x2, weight, lora_a, lora_b, bias, scaling, dropout_p, _kernel_seed(seed, dropout_p, x),
            keep_threshold(dropout_p))
    y, s = fwd(*args, mask=mask) if packed else fwd(*args)
    return y, s, mask


@lora_linear_fwd_op.register_fake
def _(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend, dropout_mask="regenerate"):
    m = lead_rows(x)
    packed = dropout_mask == "packed" and dropout_p > 0
    mask = x.new_empty(packed_mask_shape(m, x.shape[-1]) if packed else (0,), dtype=torch.uint8)
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, lora_a.shape[0])), mask


@torch.library.custom_op("fastpeft::lora_linear_bwd", mutates_args=())
def lora_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float,
                       seed: Optional[torch.Tensor], need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
                       backend: str, mask: Optional[torch.Tensor] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias) for dy [M, out], the rows of y; a gradient not needed comes back as an empty [0] tensor.
    mask: the forward op's packed keep bits (dropout_mask="packed"), read instead of regenerating the mask."""
    x2, dy2 = as_rows(x), as_rows(dy)
    r = lora_a.shape[0]
    if x2.shape[0] == 0 or weight.shape[0] == 0:
        dx, da, db = torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        dbias = dy.new_zeros(weight.shape[0])
    else:
        _, bwd = _impl(_resolved(backend, x, r))
        args = (dy2, x2, weight, lora_a, lora_b, s, scaling, dropout_p, _kernel_seed(seed, dropout_p, x),
                keep_threshold(dropout_p), (need_dx, need_da, need_db, need_dbias))
        dx, da, db, dbias = bwd(*args) if mask is None or dropout_p == 0 else bwd(*args, mask=mask)
        if dx is not None:
            dx = dx.view(x.shape)
    # a custom op's outputs may not alias each other: a fresh empty tensor for each gradient not needed
    return (dx if need_dx else x.new_empty((0,)), da if need_da else lora_a.new_empty((0,)),
            db if need_db else lora_b.new_empty((0,)), dbias if need_dbias else dy.new_empty((0,)))


@lora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, need_da, need_db, need_dbias, backend,
      mask=None):
    def maybe(need, like, shape):
        return like.new_empty(shape) if need else like.new_empty((0,))
    return (maybe(need_dx, x, x.shape), maybe(need_da, lora_a, lora_a.shape), maybe(need_db, lora_b, lora_b.shape),
            maybe(need_dbias, dy, (weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend = inputs[:9]
    mask = output[2] if output[2].numel() else None  # the packed keep bits (dropout_mask="packed")
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed, mask)  # seed: a tensor or None
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.has_bias = scaling, dropout_p, backend, bias is not None
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, dy, _ds, _mask):
    x, weight, lora_a, lora_b, s, seed, mask = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
    need_dbias = need_dbias and ctx.has_bias
    dx = dw = da = db = dbias = None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True on an eager call of the op: differentiable formulas, as LoRALinearFunction does
        needs = (need_dx, need_da, need_db, need_dbias)
        if any(needs):
            dx, da, db, dbias = _differentiable_backward(dy, as_rows(x), weight, lora_a, lora_b, ctx.scaling,
                                                         ctx.dropout_p, _kernel_seed(seed, ctx.dropout_p, x), needs)
            dx = dx.view(x.shape) if dx is not None else None
    elif need_dx or need_da or need_db or need_dbias:
        dx, da, db, dbias = torch.ops.fastpeft.lora_linear_bwd(
            dy, x, weight, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, seed,
            need_dx, need_da, need_db, need_dbias, ctx.backend, mask)
        dx, da, db, dbias = (g if need else None for g, need in
                             ((dx, need_dx), (da, need_da), (db, need_db), (dbias, need_dbias)))
    if need_dw:  # W0 is frozen in LoRA; a caller who trains it anyway gets its exact gradient
        dw = (as_rows(dy).t() @ as_rows(x)).to(weight.dtype)
    return dx, dw, da, db, dbias, None, None, None, None, None


torch.library.register_autograd("fastpeft::lora_linear_fwd", _backward, setup_context=_setup_context)


def _check_scalars_at_run(scaling: float, dropout_p: float) -> None:
    # a symbolic float is specialised by the op call, but lora_linear_traced checks it only on the first trace
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")


__all__ = ["lora_linear_fwd_op", "lora_linear_bwd_op", "lora_linear_traced"]
