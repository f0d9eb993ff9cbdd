"""fastpeft.ia3_linear: a frozen linear with a learned IA3 vector l in its GEMM.

scale="output": y = (x·Wᵀ + b) ⊙ l (PEFT's IA3 on k/v projections, bias scaled too);
scale="input":  y = (x ⊙ l)·Wᵀ + b (PEFT's feed-forward IA3).
Backends: "triton" (kernels/ia3.py), "cublas" (ia3_cublas.py: cuBLAS GEMMs, the vector in one Triton pass on
the cheaper side) and "torch" (ia3_torch.py); auto on CUDA measures them per shape (ia3_auto.py). Saved for backward: x (the caller's
tensor), W, b and l; never the output (users may edit it in place) and no [M, N] tensor: for output
scaling the backward recomputes the pre-scale product x·Wᵀ + b when l needs a gradient.

Eager calls run IA3LinearFunction. Under torch.compile, ia3_linear_traced calls the torch.library ops
torch.ops.fastpeft.ia3_linear_fwd/bwd, which ia3_custom_op.py registers (importing this module, never
imported by it; fastpeft/__init__.py imports both).
"""
from __future__ import annotations

import torch

from .._backend import MEASURED, requested_backend, resolve_backend
from .._checks import check_float_dtype, check_same_device, check_tensor
from .call_cache import CallCache, cacheable, tensor_key
from .ia3_backends import launchers
from .shapes import as_rows

SCALE_MODES = ("output", "input")
DOUBLE_BACKWARD_MESSAGE = (
    "ia3_linear: double backward (create_graph=True, e.g. a gradient penalty) is not supported: the "
    "fused backward is not differentiable; use torch.func or an eager IA3 for higher-order gradients")


def _impl(backend: str):
    if backend == MEASURED:  # auto on CUDA: each pass dispatched by shape to the backend measured fastest
        from .ia3_auto import ia3_bwd_measured, ia3_fwd_measured

        return ia3_fwd_measured, ia3_bwd_measured
    return launchers(backend)


def resolve_ia3_backend(backend, device: torch.device) -> str:
    """The backend that runs IA3 on `device` (fastpeft._backend.resolve_backend): every input the op accepts
    has a Triton and a cuBLAS path; auto on CUDA is "measured" (ops/ia3_auto.py)."""
    return resolve_backend(backend, device, cublas_ok=None, op="ia3_linear", measured=True)


def _forward(backend, x, weight, bias, scale, mode):
    """y is allocated here in its final shape and the backend writes it through a 2-D view, so the tensor
    handed to the caller is not a view (autograd forbids in-place edits of views made inside a Function)."""
    fwd, _ = _impl(backend)
    y = torch.empty((*x.shape[:-1], weight.shape[0]), device=x.device, dtype=x.dtype)
    fwd(as_rows(x), weight, bias, scale, mode, out=y.view(-1, weight.shape[0]))
    return y


def _frozen_grads(dy2, x2, weight, bias, scale, mode, need_w: bool, need_b: bool):
    """Gradients of W and b, which IA3 keeps frozen: exact for a caller who trains them anyway (torch ops)."""
    l = scale.float()
    g = (dy2.float() * l) if mode == "output" else dy2.float()
    xi = x2.float() * l if mode == "input" else x2.float()
    dw = (g.t() @ xi).to(weight.dtype) if need_w else None
    db = g.sum(0).to(bias.dtype) if need_b else None
    return dw, db


class IA3LinearFunction(torch.autograd.Function):
    """Autograd Function of IA3 on a linear. Use fastpeft.ia3_linear, which validates inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, mode, backend):
        y = _forward(backend, x, weight, bias, scale, mode)
        ctx.save_for_backward(x, weight, bias, scale)
        ctx.mode, ctx.backend = mode, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: this backward is not itself differentiable
            raise NotImplementedError(DOUBLE_BACKWARD_MESSAGE)
        x, weight, bias, scale = ctx.saved_tensors
        need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
        x2, dy2 = as_rows(x), as_rows(dy)
        dx = dw = db = dl = None
        if need_x or need_l:
            _, bwd = _impl(ctx.backend)
            dx, dl = bwd(dy2, x2, weight, bias, scale, ctx.mode, need_x, need_l)
            dx = dx.view(x.shape) if dx is not None else None
            dl = dl.to(scale.dtype) if dl is not None else None
        if need_w or need_b:  # W and b are frozen in IA3; a caller who trains them anyway gets exact gradients
            dw, db = _frozen_grads(dy2, x2, weight, bias, scale, ctx.mode, need_w, need_b)
        return dx, dw, db, dl, None, None


def check_ia3_inputs(x, weight, bias, scale, mode) -> None:
    """Validate the arguments of ia3_linear."""
    check_tensor("x", x)
    check_tensor("weight", weight, 2)
    check_tensor("scale", scale, 1)
    if bias is not None:
        check_tensor("bias", bias, 1)
    if not isinstance(mode, str) or mode not in SCALE_MODES:
        raise ValueError(f"mode: expected one of {SCALE_MODES}, got {mode!r}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [..., in_features], got a 0-D tensor")
    out_f, in_f = weight.shape
    if out_f < 1 or in_f < 1:
        raise ValueError("weight: expected shape [out_features, in_features] with both >= 1, "
                         f"got {tuple(weight.shape)}")
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected last dimension {in_f} (weight is [out, in] = {list(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias: expected shape [{out_f}], got {tuple(bias.shape)}")
    n = out_f if mode == "output" else in_f
    if tuple(scale.shape) != (n,):
        what = "out_features" if mode == "output" else "in_features"
        raise ValueError(f"scale: expected shape [{n}] ({what}, for mode={mode!r}), got {tuple(scale.shape)}")
    check_same_device(x=x, weight=weight, bias=bias, scale=scale)
    check_float_dtype("x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if scale.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"scale: expected dtype {x.dtype} (the dtype of x) or torch.float32, got {scale.dtype}")


def ia3_linear(x, weight, bias, scale, mode="output", *, backend=None):
    """IA3 linear: (x·weightᵀ + bias) ⊙ scale (mode "output") or (x ⊙ scale)·weightᵀ + bias (mode "input").

    x [..., in] (fp32, fp16 or bf16); weight [out, in] and bias [out] (or None) in x's dtype; scale [out] or
    [in] in x's dtype or fp32. backend: "auto" (default, or $FASTPEFT_BACKEND), "triton", "cublas", "torch".
    Every tensor (and the gradient of the output) may come at any strides: sliced, transposed, expanded
    (stride 0), offset views; leading dims of x that no single stride spans are copied once. The output is a
    new tensor that may be modified in place. The gradient of scale is exact for every value (0, subnormal).
    Double backward raises NotImplementedError.
    """
    if torch.compiler.is_compiling():  # traced: the torch.library ops, no graph break
        return ia3_linear_traced(x, weight, bias, scale, mode, backend=backend)
    check_ia3_inputs(x, weight, bias, scale, mode)
    return _run(resolve_ia3_backend(backend, x.device), x, weight, bias, scale, mode)


def _run(name, x, weight, bias, scale, mode):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, scale)):
        return IA3LinearFunction.apply(x, weight, bias, scale, mode, name)
    return _forward(name, x, weight, bias, scale, mode)


def ia3_linear_cached(cache: CallCache, x, weight, bias, scale, mode="output", backend=None):
    """fastpeft.ia3_linear with its checks and backend choice cached in `cache` (see ops/call_cache.py): what
    IA3Linear calls."""
    if not cacheable(x):
        return ia3_linear(x, weight, bias, scale, mode, backend=backend)
    key = (x.dtype, x.device, x.shape[-1], tensor_key(weight), tensor_key(bias), tensor_key(scale), mode, backend)
    if key != cache.key:
        cache.key = None
        check_ia3_inputs(x, weight, bias, scale, mode)
        cache.plan = resolve_ia3_backend(backend, x.device)
        cache.key = key
    return _run(cache.plan, x, weight, bias, scale, mode)


def ia3_linear_traced(x, weight, bias, scale, mode="output", *, backend=None):
    """fastpeft.ia3_linear through the torch.library ops (ia3_custom_op.py): what a compiled graph calls.
    The same checks (all traceable); the backend is resolved by the op at run time."""
    check_ia3_inputs(x, weight, bias, scale, mode)
    if backend is not None:
        requested_backend(backend)  # a bad name fails while tracing, not at the first run
    return torch.ops.fastpeft.ia3_linear_fwd(x, weight, bias, scale, mode, backend or "")


__all__ = ["ia3_linear", "ia3_linear_cached", "IA3LinearFunction", "ia3_linear_traced", "check_ia3_inputs",
           "SCALE_MODES", "resolve_ia3_backend"]
