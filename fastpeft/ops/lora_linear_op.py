"""torch.library ops of the fused LoRA linear, so that torch.compile(fullgraph=True) traces it.

"fastpeft::lora_linear_fwd" and "fastpeft::lora_linear_bwd" wrap the backend launchers (the same (fwd, bwd)
pair LoRALinearFunction uses), with fake implementations for tracing and an autograd formula. Eager calls
stay on LoRALinearFunction: a custom op's dispatch costs microseconds that matter at decode.
fastpeft.lora_linear routes here only while torch.compiler.is_compiling().

The seed. A compiled graph cannot turn a tensor into a Python int without a graph break (.item()), and a
Python int baked into the graph would repeat one dropout mask every step. So the seed travels as a 0-d
int64 CPU tensor: drawn inside the graph by torch.randint (from torch's CPU generator, fresh on every call)
when the caller passes none, and read with int() only inside the ops' real implementations, which the
compiler treats as opaque. It lives on the CPU, so reading it never synchronises a GPU.
"""

import math
from typing import Optional

import torch

from .._backend import requested_backend, resolve_backend
from ..dropout import SEED_BOUND, keep_threshold
from .lora_linear import MAX_TRITON_RANK, _differentiable_backward, _impl, _unrows, check_lora_inputs


def _resolved(backend: str, x: torch.Tensor, r: int) -> str:
    # the same choice fastpeft.lora_linear makes in eager mode
    rank_reason = None if r <= MAX_TRITON_RANK else f"r={r} exceeds the kernels' maximum rank {MAX_TRITON_RANK}"
    return resolve_backend(backend or None, x.device, triton_ok=rank_reason, cuda_ok=rank_reason, op="lora_linear")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _lead_rows(x: torch.Tensor):  # a product of (possibly symbolic) sizes
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    return m


@torch.library.custom_op("fastpeft::lora_linear_fwd", mutates_args=())
def lora_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       bias: Optional[torch.Tensor], scaling: float, dropout_p: float, seed: torch.Tensor,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, out] in x's dtype, the rows of x [..., in]; S [M, r] saved for backward); inputs already validated.

    y comes back as rows, not viewed to x's leading shape: lora_linear_traced reshapes it outside the op, so
    no output is a view made inside the op's autograd Function (which in-place ops after it could not follow).
    """
    _check_scalars_at_run(scaling, dropout_p)
    x2 = _rows(x)
    m, n, r = x2.shape[0], weight.shape[0], lora_a.shape[0]
    if m == 0 or n == 0:  # nothing to compute; no kernel is launched on an empty grid
        return x.new_empty((m, n)), x.new_zeros((m, r))
    fwd, _ = _impl(_resolved(backend, x, r))
    seed_i = int(seed) if dropout_p > 0 else 0
    return fwd(x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed_i, keep_threshold(dropout_p))


@lora_linear_fwd_op.register_fake
def _(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend):
    m = _lead_rows(x)
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, lora_a.shape[0]))


@torch.library.custom_op("fastpeft::lora_linear_bwd", mutates_args=())
def lora_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                       need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias) for dy [M, out], the rows of y; a gradient not needed comes back as an empty [0] tensor."""
    x2, dy2 = _rows(x), _rows(dy)
    r = lora_a.shape[0]
    if x2.shape[0] == 0 or weight.shape[0] == 0:
        dx, da, db = torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        dbias = dy.new_zeros(weight.shape[0])
    else:
        _, bwd = _impl(_resolved(backend, x, r))
        seed_i = int(seed) if dropout_p > 0 else 0
        dx, da, db, dbias = bwd(dy2, x2, weight, lora_a, lora_b, s, scaling, dropout_p, seed_i,
                                keep_threshold(dropout_p), (need_dx, need_da, need_db, need_dbias))
        if dx is not None:
            dx = dx.view(x.shape)
    # a custom op's outputs may not alias each other: a fresh empty tensor for each gradient not needed
    return (dx if need_dx else x.new_empty((0,)), da if need_da else lora_a.new_empty((0,)),
            db if need_db else lora_b.new_empty((0,)), dbias if need_dbias else dy.new_empty((0,)))


@lora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, need_da, need_db, need_dbias, backend):
    def maybe(need, like, shape):
        return like.new_empty(shape) if need else like.new_empty((0,))
    return (maybe(need_dx, x, x.shape), maybe(need_da, lora_a, lora_a.shape), maybe(need_db, lora_b, lora_b.shape),
            maybe(need_dbias, dy, (weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.has_bias = scaling, dropout_p, backend, bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _ds):
    x, weight, lora_a, lora_b, s, seed = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
    need_dbias = need_dbias and ctx.has_bias
    dx = dw = da = db = dbias = None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True on an eager call of the op: differentiable formulas, as LoRALinearFunction does
        needs = (need_dx, need_da, need_db, need_dbias)
        if any(needs):
            dx, da, db, dbias = _differentiable_backward(dy, _rows(x), weight, lora_a, lora_b, ctx.scaling,
                                                         ctx.dropout_p, int(seed) if ctx.dropout_p > 0 else 0, needs)
            dx = dx.view(x.shape) if dx is not None else None
    elif need_dx or need_da or need_db or need_dbias:
        dx, da, db, dbias = torch.ops.fastpeft.lora_linear_bwd(
            dy, x, weight, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, seed,
            need_dx, need_da, need_db, need_dbias, ctx.backend)
        dx, da, db, dbias = (g if need else None for g, need in
                             ((dx, need_dx), (da, need_da), (db, need_db), (dbias, need_dbias)))
    if need_dw:  # W0 is frozen in LoRA; a caller who trains it anyway gets its exact gradient
        dw = (_rows(dy).t() @ _rows(x)).to(weight.dtype)
    return dx, dw, da, db, dbias, None, None, None, None


torch.library.register_autograd("fastpeft::lora_linear_fwd", _backward, setup_context=_setup_context)


def _check_scalars(scaling, dropout_p):
    """check_lora_inputs' scalar checks in a form Dynamo traces: after a recompile a float argument may be
    symbolic, and math.isfinite() of a symbolic float is a graph break; comparisons are not (they guard)."""
    for name, v in (("scaling", scaling), ("dropout_p", dropout_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    if not scaling - scaling == 0:  # false exactly for inf and nan
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    return scaling, dropout_p


def _check_scalars_at_run(scaling: float, dropout_p: float) -> None:
    # a symbolic float is specialised by the op call, but checked above only on the first trace: check the value
    if not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite number, got {scaling}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")


def lora_linear_traced(x, weight, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, training=True, *,
                       seed=None, backend=None):
    """fastpeft.lora_linear through the torch.library ops: what a compiled graph calls.

    Same arguments and checks as fastpeft.lora_linear; `seed` may also be a 0-d integer tensor.
    """
    scaling, dropout_p = _check_scalars(scaling, dropout_p)
    check_lora_inputs(x, weight, lora_a, lora_b, bias, 1.0, 0.0)  # the tensor checks
    if backend is not None:
        requested_backend(backend)  # a bad name fails while tracing, not at the first run
    p = dropout_p if training else 0.0
    if p > 0 and seed is None:
        seed_t = torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device="cpu")
    elif p > 0 and isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(f"seed: expected a 0-d torch.int64 CPU tensor, got shape {tuple(seed.shape)}, "
                             f"{seed.dtype} on {seed.device}")
        seed_t = seed
    elif p > 0:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_BOUND:
            raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}] or None, got {seed!r}")
        seed_t = torch.tensor(seed, dtype=torch.int64)
    else:
        seed_t = torch.zeros((), dtype=torch.int64)
    y2, _ = torch.ops.fastpeft.lora_linear_fwd(x, weight, lora_a, lora_b, bias, scaling, p, seed_t, backend or "")
    return _unrows(y2, x)


__all__ = ["lora_linear_fwd_op", "lora_linear_bwd_op", "lora_linear_traced"]
