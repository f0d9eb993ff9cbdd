"""fastpeft.dora_linear: HF PEFT's DoRA (use_dora=True) as one op, y = m ⊙ (W0 + s·B·A)·x / ‖W0 + s·B·A‖ + b.

PEFT's definition, exactly (peft/tuners/lora/dora.py, DoraLinearLayer.forward with its LoRA variant):

    y = x·W0ᵀ + b + (g − 1)⊙(xd·W0ᵀ) + g⊙(s·(xd·Aᵀ)·Bᵀ),   g = m / ‖W0 + s·B·A‖ per output row, the norm detached

where xd = dropout(x) (xd = x without dropout, where y = g⊙(x·W0ᵀ + s·x·Aᵀ·Bᵀ) + b = x·W'ᵀ + b). The norm is never
formed from W0 + s·B·A: ‖w_i + s·b_i·A‖² = ‖w_i‖² + 2s·b_i·(A·w_iᵀ) + s²·b_i·(A·Aᵀ)·b_iᵀ, with ‖w_i‖² passed in
by the layers that cache it (W0 is frozen) and A·W0ᵀ one skinny [r, out] product per call
(ops/dora_linear_torch.py `dora_norm`). The output is the fused LoRA GEMM with g in its epilogue.

Backends: "triton" (ops/dora_linear_triton.py over kernels/lora_linear.py) and "torch"
(ops/dora_linear_torch.py), the same decomposition; there are no CUDA C++ kernels for DoRA. Saved for backward:
x itself, S = xd·Aᵀ, g and the norm ([out] each), the seed, and V = xd·W0ᵀ + s·S·Bᵀ [M, out] only when the
magnitude needs its gradient. First-order gradients only: double backward raises NotImplementedError.

Eager calls run DoRALinearFunction. Under torch.compile, dora_linear_traced calls torch.ops.fastpeft.dora_linear_fwd
/ _bwd, registered by dora_linear_custom_op.py (which imports this module, never the reverse).
"""
from __future__ import annotations

import torch

from .._backend import requested_backend, resolve_backend
from .._checks import check_float_dtype, check_same_device, check_tensor
from ..dropout import SEED_BOUND, draw_seed, keep_threshold, traced_seed
from ..limits import LORA_MAX_RANK_TRITON
from .dora_linear_torch import dora_linear_bwd_torch, dora_linear_fwd_torch, dora_norm
from .lora_linear import _check_scalars, _unrows, check_lora_inputs, check_lora_tensors
from .shapes import as_rows

DOUBLE_BACKWARD_MESSAGE = (
    "dora_linear: double backward (create_graph=True, e.g. a gradient penalty) is not supported: the fused "
    "backward is not differentiable; use PEFT's eager DoRA for higher-order gradients")
NO_CUDA_KERNELS = "DoRA has no CUDA C++ kernels (use backend='triton')"


def _impl(backend: str):
    if backend == "triton":
        from .dora_linear_triton import dora_linear_bwd_triton, dora_linear_fwd_triton

        return dora_linear_fwd_triton, dora_linear_bwd_triton
    return dora_linear_fwd_torch, dora_linear_bwd_torch


def resolve_dora_backend(backend: str | None, device: torch.device, r: int) -> str:
    """The backend that runs a DoRA linear of rank r on `device` (see fastpeft._backend.resolve_backend)."""
    triton_reason = None if r <= LORA_MAX_RANK_TRITON else \
        f"r={r} exceeds the kernels' maximum rank {LORA_MAX_RANK_TRITON}"
    return resolve_backend(backend, device, triton_ok=triton_reason, cuda_ok=NO_CUDA_KERNELS, op="dora_linear")


def check_dora_tensors(x, weight, lora_a, lora_b, magnitude, bias, weight_norm_sq=None) -> None:
    """The LoRA tensors' checks, plus magnitude [out] (a float tensor on x's device) and, if given, the cached
    ‖w_i‖² [out] in fp32."""
    check_lora_tensors(x, weight, lora_a, lora_b, bias)
    check_tensor("magnitude", magnitude, 1)
    out_f = weight.shape[0]
    if magnitude.shape[0] != out_f:
        raise ValueError(f"magnitude: expected shape [{out_f}] (one entry per output feature of weight "
                         f"{list(weight.shape)}), got {tuple(magnitude.shape)}")
    check_float_dtype("magnitude", magnitude)
    check_same_device(x=x, magnitude=magnitude)
    if weight_norm_sq is not None:
        check_tensor("weight_norm_sq", weight_norm_sq, 1)
        if weight_norm_sq.shape[0] != out_f or weight_norm_sq.dtype != torch.float32:
            raise ValueError(f"weight_norm_sq: expected a torch.float32 tensor of shape [{out_f}] (‖w_i‖² per row "
                             f"of weight), got {weight_norm_sq.dtype} of shape {tuple(weight_norm_sq.shape)}")
        check_same_device(x=x, weight_norm_sq=weight_norm_sq)


def check_dora_inputs(x, weight, lora_a, lora_b, magnitude, bias, scaling, dropout_p,
                      weight_norm_sq=None) -> tuple[float, float]:
    """Validate the arguments of dora_linear; returns (scaling, dropout_p) as floats."""
    check_dora_tensors(x, weight, lora_a, lora_b, magnitude, bias, weight_norm_sq)
    return check_lora_inputs(x, weight, lora_a, lora_b, bias, scaling, dropout_p)


def dora_scale(weight, lora_a, lora_b, magnitude, scaling: float, weight_norm_sq=None):
    """(g = m/‖W0 + s·B·A‖, the norm), both fp32 [out] and detached: what the forward's epilogue applies."""
    with torch.no_grad():
        norm = dora_norm(weight.detach(), lora_a.detach(), lora_b.detach(), scaling, weight_norm_sq)
        return magnitude.detach().to(torch.float32) / norm, norm


def _forward(x2, weight, lora_a, lora_b, magnitude, bias, w_sq, scaling, p, seed, backend, save_pre):
    """(y [M, out], S [M, r], V [M, out] or None, g, norm) on rows x2 [M, in]."""
    g, norm = dora_scale(weight, lora_a, lora_b, magnitude, scaling, w_sq)
    m, n = x2.shape[0], weight.shape[0]
    if m == 0 or n == 0:  # nothing to compute; no kernel is launched on an empty grid
        return (x2.new_empty((m, n)), x2.new_zeros((m, lora_a.shape[0])),
                x2.new_zeros((m, n)) if save_pre else None, g, norm)
    fwd, _ = _impl(backend)
    y2, s, v = fwd(x2, weight, lora_a, lora_b, bias, g, scaling, p, seed, keep_threshold(p), save_pre)
    return y2, s, v, g, norm


def dora_backward(dy2, x2, weight, lora_a, lora_b, s, v, g, norm, scaling, p, seed, backend, needs):
    """(dx [M, in], dW, dA, dB, dm fp32, dbias fp32) on rows; needs = (dx, dW, dA, dB, dm, dbias)."""
    need_dx, need_dw, need_da, need_db, need_dm, need_dbias = needs
    dx = dw = da = db = dm = dbias = None
    if x2.shape[0] == 0 or weight.shape[0] == 0:  # empty: no kernel launch
        dx = torch.zeros_like(x2) if need_dx else None
        da = torch.zeros_like(lora_a) if need_da else None
        db = torch.zeros_like(lora_b) if need_db else None
        dm = g.new_zeros(g.shape) if need_dm else None
        dbias = g.new_zeros(g.shape) if need_dbias else None
    elif need_dx or need_da or need_db or need_dm or need_dbias:
        _, bwd = _impl(backend)
        dx, da, db, dm, dbias = bwd(dy2, x2, weight, lora_a, lora_b, s, v, g, norm, scaling, p, seed,
                                    keep_threshold(p), (need_dx, need_da, need_db, need_dm, need_dbias))
    if need_dw:  # W0 is frozen in DoRA; a caller who trains it anyway gets its exact gradient (the norm detached)
        if p == 0:
            dw = (dy2 * g).to(dy2.dtype).t() @ x2
        else:
            from .lora_linear_torch import _dropped

            dw = dy2.t() @ x2 + (dy2 * (g - 1.0)).to(dy2.dtype).t() @ _dropped(x2, p, seed)
        dw = dw.to(weight.dtype)
    return dx, dw, da, db, dm, dbias


class DoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the DoRA linear, on rows: x [..., in] -> y [M, out]. Use fastpeft.dora_linear, which
    validates inputs and restores x's leading shape outside the Function (so the output can be modified in place)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, magnitude, bias, w_sq, scaling, dropout_p, seed, backend):
        save_pre = ctx.needs_input_grad[4]  # V only for the magnitude's gradient
        y2, s, v, g, norm = _forward(as_rows(x), weight, lora_a, lora_b, magnitude, bias, w_sq, scaling, dropout_p,
                                     seed, backend, save_pre)
        ctx.save_for_backward(x, weight, lora_a, lora_b, s, v, g, norm)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
        ctx.has_bias, ctx.m_dtype = bias is not None, magnitude.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y2

    @staticmethod
    def backward(ctx, dy2):
        if torch.is_grad_enabled():  # create_graph=True: this backward is not itself differentiable
            raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)
        x, weight, lora_a, lora_b, s, v, g, norm = ctx.saved_tensors
        need_dx, need_dw, need_da, need_db, need_dm, need_dbias = ctx.needs_input_grad[:6]
        needs = (need_dx, need_dw, need_da, need_db, need_dm, need_dbias and ctx.has_bias)
        dx, dw, da, db, dm, dbias = dora_backward(dy2, as_rows(x), weight, lora_a, lora_b, s, v, g, norm, ctx.scaling,
                                                  ctx.dropout_p, ctx.seed, ctx.backend, needs)
        if dx is not None:
            dx = dx.view(x.shape)
        if dm is not None:
            dm = dm.to(ctx.m_dtype)
        if dbias is not None:
            dbias = dbias.to(ctx.b_dtype)
        return dx, dw, da, db, dm, dbias, None, None, None, None, None


def _seed(seed, p: float, device):
    if p == 0:
        return 0
    if seed is None:  # an int; a device tensor while a CUDA graph is captured, so each replay gets a fresh mask
        return draw_seed(device)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_BOUND:
        raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}] or None, got {seed!r}")
    return seed


def dora_linear(x, weight, lora_a, lora_b, magnitude, scaling, bias=None, dropout_p=0.0, training=True, *,
                seed=None, backend=None, weight_norm_sq=None):
    """DoRA linear in HF PEFT's layout and semantics (LoraConfig(use_dora=True)); see the module docstring.

    x [..., in] (fp32, fp16 or bf16); weight [out, in] and bias [out] in x's dtype; lora_a [r, in] and lora_b
    [out, r] in x's dtype or fp32; magnitude [out] (PEFT's lora_magnitude_vector) in any float dtype, its
    gradient in that dtype. Any strides. weight_norm_sq: ‖w_i‖² of weight's rows, fp32 [out], when the caller
    caches it (W0 frozen); computed when None. Dropout applies only when `training`, from `seed` (drawn from
    torch's CPU generator when None), never stored. The result is a fresh tensor that may be modified in place.
    backend: "auto" (default, or $FASTPEFT_BACKEND), "triton" or "torch".
    """
    if torch.compiler.is_compiling():  # traced: the torch.library ops, no graph break
        return dora_linear_traced(x, weight, lora_a, lora_b, magnitude, scaling, bias, dropout_p, training, seed=seed,
                                  backend=backend, weight_norm_sq=weight_norm_sq)
    scaling, dropout_p = check_dora_inputs(x, weight, lora_a, lora_b, magnitude, bias, scaling, dropout_p,
                                           weight_norm_sq)
    name = resolve_dora_backend(backend, x.device, lora_a.shape[0])
    p = dropout_p if training else 0.0
    seed = _seed(seed, p, x.device)
    return dora_linear_checked(x, weight, lora_a, lora_b, magnitude, scaling, bias, p, seed, name, weight_norm_sq)


def dora_linear_checked(x, weight, lora_a, lora_b, magnitude, scaling, bias, p, seed, backend, w_sq):
    """dora_linear after its checks (scaling and p floats, seed resolved, backend a resolved name)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, lora_a, lora_b, magnitude, bias)):
        y2 = DoRALinearFunction.apply(x, weight, lora_a, lora_b, magnitude, bias, w_sq, scaling, p, seed, backend)
    else:  # inference: the backend's forward without autograd's bookkeeping
        y2 = _forward(as_rows(x), weight, lora_a, lora_b, magnitude, bias, w_sq, scaling, p, seed, backend, False)[0]
    return _unrows(y2, x)


def dora_linear_traced(x, weight, lora_a, lora_b, magnitude, scaling, bias=None, dropout_p=0.0, training=True, *,
                       seed=None, backend=None, weight_norm_sq=None):
    """fastpeft.dora_linear through the torch.library ops (dora_linear_custom_op.py): what a compiled graph calls.
    The seed travels as lora_linear_traced's does (a 0-d int64 tensor on x's device, drawn in the graph when None)."""
    scaling, dropout_p = _check_scalars(scaling, dropout_p)
    check_dora_tensors(x, weight, lora_a, lora_b, magnitude, bias, weight_norm_sq)
    if backend is not None:
        requested_backend(backend)  # a bad name fails while tracing, not at the first run
    p = dropout_p if training else 0.0
    seed_t = traced_seed(seed, p, x.device)
    save_pre = torch.is_grad_enabled() and magnitude.requires_grad
    y2 = torch.ops.fastpeft.dora_linear_fwd(x, weight, lora_a, lora_b, magnitude, bias, weight_norm_sq, scaling, p,
                                            seed_t, backend or "", save_pre)[0]
    return _unrows(y2, x)


def dora_linear_amp(x, weight, lora_a, lora_b, magnitude, scaling, bias=None, dropout_p=0.0, training=True, *,
                    seed=None, backend=None, weight_norm_sq=None):
    """fastpeft.dora_linear that honours torch.autocast as nn.Linear does (fastpeft.autocast's rules; the magnitude,
    like fp32 adapters, keeps its dtype)."""
    from ..autocast import _cast, autocast_dtype

    dtype = autocast_dtype(x.device)
    if dtype is None:
        return dora_linear(x, weight, lora_a, lora_b, magnitude, scaling, bias, dropout_p, training, seed=seed,
                           backend=backend, weight_norm_sq=weight_norm_sq)
    x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    if lora_a.dtype != torch.float32 or lora_b.dtype != torch.float32:
        lora_a, lora_b = _cast(lora_a, dtype), _cast(lora_b, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return dora_linear(x, weight, lora_a, lora_b, magnitude, scaling, bias, dropout_p, training, seed=seed,
                           backend=backend, weight_norm_sq=weight_norm_sq)


__all__ = ["dora_linear", "dora_linear_amp", "dora_linear_traced", "DoRALinearFunction", "dora_scale",
           "resolve_dora_backend", "check_dora_inputs", "check_dora_tensors", "dora_backward", "dora_linear_checked"]
