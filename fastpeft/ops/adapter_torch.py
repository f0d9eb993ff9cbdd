"""The PyTorch backend of the fused bottleneck adapter: the kernels' decomposition in plain torch ops.

Same signatures and the same saved tensors (x and the fp32 pre-activation Z) as kernels/adapter.py, so
the two backends are interchangeable within one training run. This is the CPU path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# the activations every backend implements (kernels/adapter.py numbers them in this order)
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def activation(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def activation_grad(z: torch.Tensor, act: str) -> torch.Tensor:
    """d act / dz, exactly (same formulas as the kernels)."""
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    if act == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_C * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def adapter_fwd_torch(x, residual, down_w, down_b, up_w, up_b, scaling: float, act: str, store_z: bool, out=None):
    """Forward on 2-D x [M, D]: y [M, D] in x's dtype (written into `out` when given), and Z [M, A] fp32 when
    store_z (else None)."""
    dt = x.dtype
    z = F.linear(x, down_w.to(dt)).float()
    if down_b is not None:
        z = z + down_b.float()
    u = F.linear(activation(z, act).to(dt), up_w.to(dt), None if up_b is None else up_b.to(dt))
    y = torch.add(x if residual is None else residual, u, alpha=scaling, out=out)
    return y, (z if store_z else None)


def adapter_bwd_torch(dy, x, z, down_w, up_w, scaling: float, act: str, skip: bool, need_dx: bool, need_dw: bool):
    """Backward on 2-D tensors: dx (x's dtype, with dy added when skip) or None, and fp32 dWd, dbd, dWu, dbu
    (or Nones when not need_dw)."""
    dt = dy.dtype
    dz = (dy @ up_w.to(dt)).float().mul_(scaling).mul_(activation_grad(z, act))
    dx = None
    if need_dx:
        dx = dz.to(dt) @ down_w.to(dt)
        if skip:
            dx = dx + dy
    if not need_dw:
        return dx, None, None, None, None
    a = activation(z, act).to(dt)
    dwd = (dz.to(dt).t() @ x).float()
    dbd = dz.sum(0)
    dwu = (dy.t() @ a).float().mul_(scaling)
    dbu = dy.sum(0, dtype=torch.float32).mul_(scaling)
    return dx, dwd, dbd, dwu, dbu
