"""The gradient-free GaLore linear: y = x·Wᵀ + b whose backward yields the projected weight gradient only.

For y = x·Wᵀ the weight gradient is G = dYᵀ·X. The backward computes dX = dY·W and the bias gradient as
usual, and instead of G it accumulates R = (dY·P)ᵀ·X, dYᵀ·(X·Qᵀ) or (dY·P)ᵀ·(X·Qᵀ) into the fp32 buffer
of the layer's GaLoreLinearState (fastpeft.galore), which GaLoreAdamW consumes. The weight's .grad is never
written. Backends: "triton" (kernels/galore.py accumulates R in fp32 inside the skinny GEMM), "cublas"
(galore_linear_cublas.py: Triton's skinny dY·P, then cuBLAS accumulating into R as its C input) and "torch"
(galore_linear_torch.py). dX = dY·W is cuBLAS (torch.mm) in every backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import resolve_backend
from .galore_linear_torch import full_grad_accumulate_torch, projected_grad_accumulate_torch
from .shapes import as_rows


def projected_grad_accumulate(x2, dy2, p, q, out, backend: str):
    """out (fp32, contiguous) += projection of dy2ᵀ·x2 on (p, q) with the chosen backend (torch, triton, cublas)."""
    if backend == "torch":
        return projected_grad_accumulate_torch(x2, dy2, p, q, out)
    if backend == "cublas":
        from .galore_linear_cublas import projected_grad_accumulate_cublas

        return projected_grad_accumulate_cublas(x2, dy2, p, q, out)
    from ..kernels import galore as k

    if p is not None and q is not None:
        return k.galore_project((dy2 @ p.to(dy2.dtype)).t(), x2 @ q.t().to(x2.dtype), out, k.EPI_ACC)
    if p is not None:
        return k.galore_project((dy2 @ p.to(dy2.dtype)).t(), x2, out, k.EPI_ACC)
    return k.galore_project(dy2.t(), x2 @ q.t().to(x2.dtype), out, k.EPI_ACC)


def full_grad_accumulate(x2, dy2, out, backend: str):
    if backend == "torch":
        return full_grad_accumulate_torch(x2, dy2, out)
    if backend == "cublas":
        from .galore_linear_cublas import full_grad_accumulate_cublas

        return full_grad_accumulate_cublas(x2, dy2, out)
    from ..kernels import galore as k

    return k.galore_project(dy2.t(), x2, out, k.EPI_ACC)


def kernel_backend(backend, tensor: torch.Tensor) -> str:
    reason = None if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32) else f"dtype {tensor.dtype} is not supported by the kernels"
    return resolve_backend(backend, tensor.device, triton_ok=reason, cublas_ok=reason, op="galore_linear")


class GaLoreLinearFunction(torch.autograd.Function):
    """Autograd Function of the gradient-free GaLore linear; `state` is the weight's GaLoreLinearState.
    Returns no gradient for the weight: its projection goes to state (see fastpeft.galore)."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        ctx.save_for_backward(x, weight)
        ctx.state = state
        ctx.has_bias = bias is not None
        y = F.linear(x, weight, bias)
        if y._is_view():
            # F.linear with a bias on [..., in] returns a view of its 2-D product, and autograd forbids in-place
            # edits (relu_, +=) of views made inside a Function: the same memory as a non-view, no copy
            y = torch.ops.aten._unsafe_view(y, y.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: refuse before the projected gradient is accumulated
            raise NotImplementedError(
                "galore_linear: double backward (create_graph=True, e.g. a gradient penalty) is not supported: the "
                "weight's gradient is consumed as its projection, which is not differentiable")
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy2 = as_rows(dy)
        dx = dbias = None
        if need_dx:
            # a no-op without autocast; under it (16-bit dY, fp32 W) a transient [out, in] copy, as in the forward
            dx = (dy2 @ weight.to(dy2.dtype)).to(x.dtype).view(x.shape)
        if need_db and ctx.has_bias:
            dbias = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
        if need_dw:
            x2 = as_rows(x)
            if x2.dtype != dy2.dtype:  # autocast: the product ran in dY's dtype
                x2 = x2.to(dy2.dtype)
            ctx.state.accumulate(x2, dy2)
        return dx, None, dbias, None


def galore_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state) -> torch.Tensor:
    """y = x·Wᵀ + b; backward accumulates W's projected gradient into `state` instead of W.grad.

    x [..., in], weight [out, in], bias [out] or None, fp32/fp16/bf16 (the torch backend any float dtype), at
    any strides (sliced, transposed, expanded, offset views; dY too). y is a new tensor that may be modified
    in place. Double backward raises NotImplementedError."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (weight is {tuple(weight.shape)}), got {tuple(x.shape)}")
    if torch.compiler.is_compiling():  # traced: the opaque torch.library ops (see galore_linear_custom_op.py)
        from .galore_linear_custom_op import galore_linear_traced
        return galore_linear_traced(x, weight, bias, state)
    return GaLoreLinearFunction.apply(x, weight, bias, state)
