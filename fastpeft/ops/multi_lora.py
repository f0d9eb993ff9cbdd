"""fastpeft.multi_lora_linear: many LoRA adapters over one shared base weight, each token with its own adapter.

    y_m = x_m·Wᵀ + bias + s_a·(x_m·A_aᵀ)·B_aᵀ,   a = adapter_ids[m]  (-1: base only, y_m = x_m·Wᵀ + bias)

The adapters sit in one stacked pool: lora_a [R_total, in] and lora_b [out, R_total]; adapter a owns pool
rank rows offsets[a] .. offsets[a] + ranks[a] (its A rows and its B columns) and scales by scalings[a].
Ranks may differ per adapter; the kernels move each adapter's own rank, never the largest. Gradients of
the pool are per adapter, each only from its own tokens; pool rows of no adapter get zero.
Backends: "triton" (kernels/multi_lora.py, W0 read once for the whole mixed batch), "cublas"
(multi_lora_cublas.py: cuBLAS for the base GEMMs, the per-token low-rank term as their C input, Triton for the
rest) and "torch" (multi_lora_torch.py, one matmul per adapter present); auto on CUDA measures them per shape
(multi_lora_auto.py). No dropout:
serving, and training several adapters at once without LoRA dropout.

Eager calls run MultiLoRALinearFunction. Under torch.compile, prepare_ids and apply_multi_lora call the
torch.library ops torch.ops.fastpeft.multi_lora_check_ids / multi_lora_linear_fwd / _bwd, which
multi_lora_custom_op.py registers (importing this module, never imported by it; fastpeft/__init__.py imports
both). Ranks and offsets given as tensors are read on the host, a graph break: pass lists to compiled code.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .._backend import MEASURED, requested_backend, resolve_backend
from .lora_linear import check_lora_tensors
from .multi_lora_backends import _grouping, _impl  # noqa: F401 (importable from here, as before)
from .multi_lora_table import AdapterTable  # noqa: F401 (importable from here, as before)
from .multi_lora_ids import (  # noqa: F401  (importable from here, as before)
    BASE_ONLY, ID_DTYPES, KERNEL_ID_DTYPES, WIDE_UNSIGNED_ID_DTYPES, check_id_values, prepare_ids,
)
from .shapes import as_rows

from ..limits import MULTI_LORA_MAX_RANK_TRITON as MAX_TRITON_RANK  # the one limit: fastpeft/limits.py


def resolve_multi_lora_backend(backend: str | None, device: torch.device, max_rank: int) -> str:
    """The backend for a pool of this max_rank on `device` (see fastpeft._backend)."""
    reason = None
    if max_rank > MAX_TRITON_RANK:  # the cuBLAS path's skinny kernels are the same Triton kernels
        reason = f"max_rank={max_rank} exceeds the Triton kernels' maximum rank {MAX_TRITON_RANK}"
    return resolve_backend(backend or None, device, triton_ok=reason, cublas_ok=reason, op="multi_lora_linear",
                           measured=True)


def concrete_backend(backend: str, x2, weight, lora_a, lora_b, bias, table, needs=None) -> str:
    """backend, or for "measured" (auto on CUDA) the backend measured fastest for this pass (multi_lora_auto.py):
    the forward (needs None) or the backward computing needs = (dx, dA, dB). Resolved before the tokens are
    grouped, since the grouping depends on the backend."""
    if backend != MEASURED:
        return backend
    from .multi_lora_auto import bwd_choice, fwd_choice

    if needs is None:
        return fwd_choice(x2, weight, lora_a, lora_b, bias, table)
    return bwd_choice(x2, weight, lora_a, lora_b, table, needs)


def _launch_backward(backend, dy, x, weight, lora_a, lora_b, s, ids, table, grouping, grouped, needs):
    """(dx in x's shape, dA, dB) for needs = (dx, dA, dB), None where not needed; `grouping` is the forward's,
    or None: then it is made here (with the segment tiles the backward kernels need)."""
    need_dx, need_da, need_db = needs
    x2 = as_rows(x)
    m, n = x2.shape[0], weight.shape[0]
    if m == 0 or n == 0:  # nothing to compute (with N = 0, S is never read: dY·B = 0)
        return tuple(t.new_zeros(t.shape) if need else None for t, need in zip((x, lora_a, lora_b), needs))
    backend = concrete_backend(backend, x2, weight, lora_a, lora_b, None, table, needs)
    if grouping is None or grouping.tiles is None:  # a backward the forward did not prepare for
        grouping = _grouping(backend, ids, table.n_adapters, True, grouped)
    _, bwd = _impl(backend)
    dx, da, db = bwd(dy.reshape(m, n), x2, weight, lora_a, lora_b, s, ids, table, grouping, needs)
    return (dx.view(x.shape) if dx is not None else None), da, db


class _FirstOrderOnly(torch.autograd.Function):
    """Passes the first n tensors through (cloned); differentiating them raises. Used by a backward run with
    create_graph=True, whose kernels record no graph: a second derivative would otherwise be silently wrong."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "multi_lora_linear: double backward (differentiating its gradients, e.g. after "
            "torch.autograd.grad(..., create_graph=True)) is not supported; first derivatives are exact")


def first_order_only(grads: tuple, depends_on: tuple) -> tuple:
    """grads, each made to raise NotImplementedError when differentiated (depends_on: what they depend on)."""
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return grads
    deps = [t for t in depends_on if t is not None and t.requires_grad]
    outs = iter(_FirstOrderOnly.apply(len(idx), *(grads[i] for i in idx), *deps))
    return tuple(None if g is None else next(outs) for g in grads)


def _frozen_grads(dy, x, weight, need_dw: bool, need_dbias: bool):
    """Gradients of W0 and its bias, frozen in LoRA: exact for a caller who trains them anyway."""
    x2 = as_rows(x)  # in_features >= 1; dY's rows by M, which its own shape cannot give when out_features = 0
    dy2 = dy.reshape(x2.shape[0], weight.shape[0])
    dbias = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if need_dbias else None  # rare (BitFit): one dY read
    dw = (dy2.t() @ x2).to(weight.dtype) if need_dw else None
    return dw, dbias


def _forward(x, weight, lora_a, lora_b, bias, ids, table, grouped, backend, need_tiles):
    """(y [..., out], S [M, max_rank], the token grouping or None); need_tiles: a backward will need the segments."""
    x2 = as_rows(x)
    M, N = x2.shape[0], weight.shape[0]
    y = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0 or x.is_meta:  # nothing to compute (with N = 0, S is never read: dY·B = 0)
        return y, x2.new_zeros((M, table.max_rank)), None
    backend = concrete_backend(backend, x2, weight, lora_a, lora_b, bias, table)
    grouping = _grouping(backend, ids, table.n_adapters, need_tiles, grouped)
    s = _impl(backend)[0](x2, weight, lora_a, lora_b, bias, ids, table, grouping, y.view(M, N))
    return y, s, grouping


class MultiLoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the multi-adapter LoRA linear. Use fastpeft.multi_lora_linear, which validates inputs.

    ids: [M] token ids (any id dtype of prepare_ids, any stride, on x's device); grouped: consecutive tokens
    mostly share an adapter (per-sequence ids), so the forward may skip the sort. The output is allocated in
    its final shape (not a view made here), so callers may modify it in place (relu_, +=).
    Meta tensors give outputs and gradients of the right shapes.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, ids, table, grouped, backend):
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        y, s, grouping = _forward(x, weight, lora_a, lora_b, bias, ids, table, grouped, backend,
                                  need_x or need_a or need_b)
        ctx.save_for_backward(x, weight, lora_a, lora_b, s, ids)
        ctx.table, ctx.grouping, ctx.backend, ctx.grouped = table, grouping, backend, grouped
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        if not torch.is_grad_enabled():
            return MultiLoRALinearFunction._backward(ctx, dy)
        # create_graph=True: the kernels (and the torch twin, whose graph would miss the saved S) record no
        # correct graph of the gradients, so they are made to refuse a second derivative instead
        with torch.no_grad():
            grads = MultiLoRALinearFunction._backward(ctx, dy)
        return first_order_only(grads, (*ctx.saved_tensors[:4], dy))

    @staticmethod
    def _backward(ctx, dy):
        x, weight, lora_a, lora_b, s, ids = ctx.saved_tensors
        need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        need_dbias = need_dbias and ctx.has_bias
        dx = da = db = None
        if x.is_meta:
            return (x.new_empty(x.shape) if need_dx else None, weight.new_empty(weight.shape) if need_dw else None,
                    lora_a.new_empty(lora_a.shape) if need_da else None,
                    lora_b.new_empty(lora_b.shape) if need_db else None,
                    weight.new_empty(weight.shape[:1]) if need_dbias else None, None, None, None, None)
        if need_dx or need_da or need_db:
            dx, da, db = _launch_backward(ctx.backend, dy, x, weight, lora_a, lora_b, s, ids, ctx.table, ctx.grouping,
                                         ctx.grouped, (need_dx, need_da, need_db))
        dw, dbias = _frozen_grads(dy, x, weight, need_dw, need_dbias)
        return dx, dw, da, db, dbias, None, None, None, None


# ----------------------------------------------------------------------------------------------- input checks


def _int_list(name: str, values, n: int | None, minimum: int) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"{name}: expected a sequence of ints or a CPU tensor (read on the host), "
                             f"got a tensor on {values.device}")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}[{i}]: expected an int, got {type(v).__name__}")
        if v < minimum:
            raise ValueError(f"{name}[{i}]: expected an int >= {minimum}, got {v}")
        out.append(int(v))
    if n is not None and len(out) != n:
        raise ValueError(f"{name}: expected {n} entries (one per adapter, as in scalings), got {len(out)}")
    return out


def _scaling_values(scalings, device) -> tuple[int, list[float] | torch.Tensor]:
    if isinstance(scalings, torch.Tensor):
        if scalings.dim() != 1 or not scalings.is_floating_point():
            raise TypeError(f"scalings: expected a 1-D float tensor (one per adapter), got {scalings.dtype} "
                            f"of shape {tuple(scalings.shape)}")
        # traced, a CPU tensor's values are checked by the op at run time (a data-dependent branch here
        # would break the graph)
        if scalings.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.isfinite(scalings).all():
            raise ValueError(f"scalings: expected finite numbers, got {scalings.tolist()}")
        return scalings.numel(), scalings
    if isinstance(scalings, (str, bytes)) or not isinstance(scalings, Sequence):
        raise TypeError(f"scalings: expected a sequence of numbers or a 1-D tensor, got {type(scalings).__name__}")
    vals = []
    for i, v in enumerate(scalings):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float("-inf") < float(v) < float("inf"):
            raise ValueError(f"scalings[{i}]: expected a finite number, got {v!r}")
        vals.append(float(v))
    return len(vals), vals


def build_table(lora_a, scalings, ranks, offsets, max_rank, device) -> AdapterTable:
    """Validate the pool description of multi_lora_linear and build its AdapterTable."""
    r_total = lora_a.shape[0]
    n, scal = _scaling_values(scalings, device)
    if n < 1:
        raise ValueError("scalings: expected at least one adapter, got an empty sequence")
    if ranks is None:
        if r_total % n:
            raise ValueError(f"ranks: None means {n} adapters of equal rank, but lora_a has {r_total} rank rows, "
                             f"not a multiple of {n}; pass ranks")
        ranks = [r_total // n] * n
    ranks = _int_list("ranks", ranks, n, 0)
    if offsets is None:
        offsets = [sum(ranks[:i]) for i in range(n)]
    offsets = _int_list("offsets", offsets, n, 0)
    spans = sorted((o, o + r, i) for i, (o, r) in enumerate(zip(offsets, ranks)) if r > 0)
    for lo, hi, i in spans:
        if hi > r_total:
            raise ValueError(f"offsets[{i}]: adapter {i} (rank {ranks[i]}) at offset {lo} ends at {hi}, past the "
                             f"{r_total} rank rows of lora_a")
    for (lo0, hi0, i0), (lo1, hi1, i1) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise ValueError(f"offsets: adapters {i0} (rows {lo0}..{hi0}) and {i1} (rows {lo1}..{hi1}) overlap in the pool")
    top = max(ranks)
    if max_rank is None:
        max_rank = max(top, 1)
    elif isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < max(top, 1):
        raise ValueError(f"max_rank: expected an int >= {max(top, 1)} (the largest rank), got {max_rank!r}")
    return AdapterTable(ranks, offsets, scal, int(max_rank), device)


def check_multi_lora_inputs(x, weight, lora_a, lora_b, bias) -> None:
    """Validate the tensors of multi_lora_linear (shapes, devices, dtypes)."""
    check_lora_tensors(x, weight, lora_a, lora_b, bias, noun="the pool shape", rank="R_total")


def resolve_multi_backend(backend, device, table: AdapterTable) -> str:
    """The backend for the table's max_rank; traced, the name as given ("" for the default), resolved by the
    op at run time (a bad name still fails while tracing)."""
    if torch.compiler.is_compiling():
        if backend is not None:
            requested_backend(backend)
        return backend or ""
    return resolve_multi_lora_backend(backend, device, table.max_rank)


def apply_multi_lora(x, weight, lora_a, lora_b, bias, ids, table: AdapterTable, grouped: bool, backend: str):
    """Run the op on checked inputs: ids [M] on x's device (from prepare_ids), backend from resolve_multi_backend.
    Traced: the torch.library op (multi_lora_custom_op.py), which takes the table as its tensors."""
    if torch.compiler.is_compiling():
        need_tiles = torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_a, lora_b))
        y, _ = torch.ops.fastpeft.multi_lora_linear_fwd(x, weight, lora_a, lora_b, bias, ids, table.ranks,
                                                        table.offsets, table.scalings, table.max_rank, grouped,
                                                        need_tiles, backend)
        return y
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, bias)):
        return MultiLoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, ids, table, grouped, backend)
    return _forward(x, weight, lora_a, lora_b, bias, ids, table, grouped, backend, False)[0]  # no autograd bookkeeping


def multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scalings, ranks=None, offsets=None, bias=None, *,
                      max_rank=None, check_ids=True, backend=None):
    """Many LoRA adapters over one base linear, each token (or sequence) with its own adapter.

    x [..., in] (fp32, fp16 or bf16); weight [out, in] and bias [out] in x's dtype.
    lora_a [R_total, in] and lora_b [out, R_total]: the stacked pool, in x's dtype or fp32.
    Every tensor may have any strides (sliced, expanded, transposed, views); none is copied but x and dY
    where they cannot be viewed as 2-D rows, per-sequence ids of several sequences and uint16/32/64 ids
    (each an [M] int copy).
    adapter_ids: ints per token ([M] or x.shape[:-1]) or per sequence ([batch] for x of 3+ dims; see
    prepare_ids for the rule), any integer dtype; -1 = base only.
    scalings: one number per adapter (or a 1-D float tensor); their count is the number of adapters n.
    ranks, offsets: per adapter, its rank and first pool rank row (host ints); default n equal ranks, packed.
    max_rank: the kernels' rank bound (default the largest rank). check_ids: raise on ids outside [-1, n)
    (one device sync for CUDA ids); unchecked, such ids mean base only. Gradients are first order only
    (differentiating them raises NotImplementedError).
    backend: "auto" (default, or $FASTPEFT_BACKEND), "triton", "cublas" (cuBLAS GEMMs, the low-rank term as
    their C input; CUDA tensors) or "torch".
    """
    check_multi_lora_inputs(x, weight, lora_a, lora_b, bias)
    table = build_table(lora_a, scalings, ranks, offsets, max_rank, x.device)
    name = resolve_multi_backend(backend, x.device, table)
    ids, grouped = prepare_ids(adapter_ids, x, table.n_adapters, check_ids)
    return apply_multi_lora(x, weight, lora_a, lora_b, bias, ids, table, grouped, name)


__all__ = ["multi_lora_linear", "MultiLoRALinearFunction", "AdapterTable", "build_table", "prepare_ids",
           "check_multi_lora_inputs", "check_id_values", "resolve_multi_lora_backend", "apply_multi_lora", "BASE_ONLY"]
