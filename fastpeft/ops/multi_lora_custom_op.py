"""torch.library registration of the multi-adapter LoRA linear, so that torch.compile(fullgraph=True) traces it.

- "fastpeft::multi_lora_check_ids": prepare_ids' id check (a host read of the ids) inside an op's real
  implementation, so that no .item() breaks the graph. It returns the ids in a kernel dtype on x's device (a
  copy: a custom op's output may not alias its input), which the forward consumes, so it is never dead code.
- "fastpeft::multi_lora_linear_fwd" / "_bwd" wrap the backend launchers (the same ones MultiLoRALinearFunction
  runs), with fake implementations and an autograd formula. The adapter table travels as its device tensors
  and max_rank, never as host lists. The token grouping cannot cross the op boundary: the backward op sorts
  the ids again (one [M] sort).
Eager calls stay on the Function (a custom op's dispatch costs microseconds); prepare_ids and apply_multi_lora
(ops/multi_lora.py) call these ops only while torch.compiler.is_compiling(). The backend name travels as a
string ("" for the default), resolved inside the ops at run time. This module imports ops/multi_lora.py,
never the reverse; fastpeft/__init__.py imports both.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._backend import MEASURED
from .multi_lora import (
    KERNEL_ID_DTYPES, _frozen_grads, _grouping, _impl, _launch_backward, check_id_values, concrete_backend,
    first_order_only, resolve_multi_lora_backend,
)
from .shapes import as_rows, lead_rows


class _OpTable(NamedTuple):
    """What the launchers read of an AdapterTable, rebuilt inside the ops from its tensors."""
    n_adapters: int
    max_rank: int
    ranks: torch.Tensor
    offsets: torch.Tensor
    scalings: torch.Tensor
    host_ranks: Optional[list]
    host_offsets: Optional[list]


def _op_table(backend, ranks, offsets, scalings, max_rank) -> _OpTable:
    host = backend == "torch"  # only the PyTorch twin reads ranks and offsets on the host (it syncs anyway)
    return _OpTable(ranks.numel(), max_rank, ranks, offsets, scalings,
                    ranks.tolist() if host else None, offsets.tolist() if host else None)


@torch.library.custom_op("fastpeft::multi_lora_check_ids", mutates_args=())
def multi_lora_check_ids_op(adapter_ids: torch.Tensor, n_adapters: int, loaded: Optional[torch.Tensor],
                            device: torch.device) -> torch.Tensor:
    """check_id_values (loaded: None or one bool per slot), then the ids (same shape) in a kernel dtype
    (uint16/32/64 as int64) on `device`."""
    capturing = adapter_ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing:  # a host read cannot happen while a CUDA graph is captured
        check_id_values(adapter_ids, n_adapters, loaded)
    dtype = adapter_ids.dtype if adapter_ids.dtype in KERNEL_ID_DTYPES else torch.int64
    return torch.empty(adapter_ids.shape, dtype=dtype, device=device).copy_(adapter_ids)


@multi_lora_check_ids_op.register_fake
def _(adapter_ids, n_adapters, loaded, device):
    dtype = adapter_ids.dtype if adapter_ids.dtype in KERNEL_ID_DTYPES else torch.int64
    return adapter_ids.new_empty(adapter_ids.shape, dtype=dtype, device=device)


@torch.library.custom_op("fastpeft::multi_lora_linear_fwd", mutates_args=())
def multi_lora_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                             bias: Optional[torch.Tensor], ids: torch.Tensor, ranks: torch.Tensor,
                             offsets: torch.Tensor, scalings: torch.Tensor, max_rank: int, grouped: bool,
                             need_tiles: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., out] in x's dtype, S [M, max_rank] saved for backward); ids [M] on x's device, ranks and
    offsets int32, scalings fp32 (an AdapterTable's tensors); inputs already validated."""
    if scalings.device.type == "cpu" and not bool(torch.isfinite(scalings).all()):  # no device sync
        raise ValueError(f"scalings: expected finite numbers, got {scalings.tolist()}")
    name = resolve_multi_lora_backend(backend or None, x.device, max_rank)
    x2 = as_rows(x)
    m, n = x2.shape[0], weight.shape[0]
    y = torch.empty((*x.shape[:-1], n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y, x2.new_zeros((m, max_rank))
    if name == MEASURED:  # the concrete backend first: the table's host lists and the grouping depend on it
        name = concrete_backend(name, x2, weight, lora_a, lora_b, bias, _op_table(name, ranks, offsets, scalings,
                                                                                   max_rank))
    table = _op_table(name, ranks, offsets, scalings, max_rank)
    grouping = _grouping(name, ids, table.n_adapters, need_tiles, grouped)
    fwd, _ = _impl(name)
    s = fwd(x2, weight, lora_a, lora_b, bias, ids, table, grouping, y.view(m, n))
    return y, s


@multi_lora_linear_fwd_op.register_fake
def _(x, weight, lora_a, lora_b, bias, ids, ranks, offsets, scalings, max_rank, grouped, need_tiles, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((lead_rows(x), max_rank))


@torch.library.custom_op("fastpeft::multi_lora_linear_bwd", mutates_args=())
def multi_lora_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                             lora_b: torch.Tensor, s: torch.Tensor, ids: torch.Tensor, ranks: torch.Tensor,
                             offsets: torch.Tensor, scalings: torch.Tensor, max_rank: int, grouped: bool,
                             need_dx: bool, need_da: bool, need_db: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) in x's and the pool's shapes and dtypes; a gradient not needed comes back as an empty [0]
    tensor (a custom op's outputs may not alias each other)."""
    name = resolve_multi_lora_backend(backend or None, x.device, max_rank)
    if name == MEASURED and x.numel() and weight.shape[0]:  # as the forward op
        name = concrete_backend(name, as_rows(x), weight, lora_a, lora_b, None,
                                _op_table(name, ranks, offsets, scalings, max_rank), (need_dx, need_da, need_db))
    table = _op_table(name, ranks, offsets, scalings, max_rank)
    dx, da, db = _launch_backward(name, dy, x, weight, lora_a, lora_b, s, ids, table, None, grouped,
                                 (need_dx, need_da, need_db))
    # contiguous, as the fake says (the PyTorch twin's pool gradients take the pool's strides); no copy otherwise
    return (dx.contiguous() if need_dx else x.new_empty((0,)), da.contiguous() if need_da else lora_a.new_empty((0,)),
            db.contiguous() if need_db else lora_b.new_empty((0,)))


@multi_lora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, s, ids, ranks, offsets, scalings, max_rank, grouped, need_dx, need_da, need_db,
      backend):
    def maybe(need, like):
        return like.new_empty(like.shape if need else (0,))
    return maybe(need_dx, x), maybe(need_da, lora_a), maybe(need_db, lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, ids, ranks, offsets, scalings, max_rank, grouped, need_tiles, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], ids, ranks, offsets, scalings)
    ctx.max_rank, ctx.grouped, ctx.backend, ctx.has_bias = max_rank, grouped, backend, bias is not None
    ctx.mark_non_differentiable(output[1])


def _grads(ctx, dy):
    x, weight, lora_a, lora_b, s, ids, ranks, offsets, scalings = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
    dx = da = db = None
    if need_dx or need_da or need_db:
        dx, da, db = torch.ops.fastpeft.multi_lora_linear_bwd(
            dy, x, weight, lora_a, lora_b, s, ids, ranks, offsets, scalings, ctx.max_rank, ctx.grouped,
            need_dx, need_da, need_db, ctx.backend)
        dx, da, db = (dx if need_dx else None), (da if need_da else None), (db if need_db else None)
    dw, dbias = _frozen_grads(dy, x, weight, need_dw, need_dbias and ctx.has_bias)
    return (dx, dw, da, db, dbias) + (None,) * 8


def _backward(ctx, dy, _ds):
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _grads(ctx, dy)
    with torch.no_grad():  # create_graph=True on an eager op call: first derivatives only, as the Function
        grads = _grads(ctx, dy)
    return first_order_only(grads, (*ctx.saved_tensors[:4], dy))


torch.library.register_autograd("fastpeft::multi_lora_linear_fwd", _backward, setup_context=_setup_context)


__all__ = ["multi_lora_check_ids_op", "multi_lora_linear_fwd_op", "multi_lora_linear_bwd_op"]
