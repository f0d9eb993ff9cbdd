"""The one table of tolerances, per dtype, for comparing a result with its float64 reference.

Used by the benchmarks' correctness check and by the tests (tests/tolerances.py should import it).
Derivation: outputs are rounded once to the dtype (unit roundoff u: fp32 2**-24, fp16 2**-11, bf16 2**-8)
after fp32 accumulation of K products of inputs that were themselves rounded to the dtype. With inputs of
unit scale the relative error of a dot product of length K is about 2u·sqrt(K) in practice (random
rounding errors), and the GPU's TF32 products (u = 2**-11) set the fp32 row. The reference is computed in
float64 from the same dtype-rounded inputs, so only the implementation's own rounding is measured.
A result passes when |a - e| <= atol·rms(e) + rtol·|e| elementwise: atol is relative to the data's RMS.
"""
from __future__ import annotations

import math

import torch

# dtype: (atol relative to the reference's RMS, rtol)
TOLERANCES = {
    torch.float32: (2e-3, 2e-3),  # TF32 on GPU (10-bit mantissa); exact fp32 on the CPU
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tol(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype: expected one of {list(TOLERANCES)}, got {dtype}")
    return TOLERANCES[dtype]


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Worst |a - e| / (atol·rms(e) + rtol·|e|) over the elements: <= 1 passes; inf for a wrong shape or a
    non-finite value. `expected` is the float64 reference; `dtype` picks the tolerance."""
    atol, rtol = tol(dtype)
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    if expected.numel() == 0:
        return 0.0
    exp = expected.detach().to(torch.float64)
    act = actual.detach().to(device=exp.device, dtype=torch.float64)
    if not bool(torch.isfinite(act).all()):
        return math.inf
    rms = float(exp.pow(2).mean().sqrt())
    bound = exp.abs().mul_(rtol).add_(atol * max(rms, 1e-30))
    return float(((act - exp).abs_() / bound).max())


__all__ = ["TOLERANCES", "tol", "error_ratio"]
