"""The one table of tolerances for comparing a result with its float64 reference, per precision row and dtype,
derived from the accumulation length K. Used by the benchmarks' correctness check and by the tests
(tests/tolerances.py imports it).

Derivation. A result that sums K products in an fp32 accumulator, compared with float64 arithmetic on the
same dtype-rounded inputs (so input rounding is not counted), has an error, relative to the result's RMS, of
about (probabilistic rounding-error analysis, Higham & Mary 2019: errors of random sign add like a random
walk, so sums grow like sqrt(K), not K)

    u_op              the operands of the products: fp32 products rounded once (2**-24); TF32 rounds fp32
                      operands to a 10-bit mantissa (2**-11); 16-bit kernels round intermediates such as
                      S = x·Aᵀ or dS to the dtype before the next product (fp16 2**-11, bf16 2**-8)
  + u_acc·sqrt(K)     the fp32 accumulation of K terms (u_acc = 2**-24)
  + u_out             the result's own rounding to its dtype (fp32 2**-24, fp16 2**-11, bf16 2**-8)

and the tolerance is C times that, with C = 4: a few such roundings chained (forward, then a backward through
a rounded intermediate) and the tail of the error's distribution over thousands of elements (~4 standard
deviations). The same bound serves as atol (times the reference's RMS) and rtol: a result passes when
|a - e| <= bound·(rms(e) + |e|) elementwise.

Rows: "fp32" is exact fp32 (the CPU, the Triton interpreter, and CUDA with
torch.get_float32_matmul_precision() == "highest", PyTorch's default, where the kernels use ieee dots);
"tf32" is fp32 on CUDA with precision "high"; "fp32-bf16" is precision "medium" (PyTorch may then multiply
fp32 in bf16); "fp16" and "bf16". The row is chosen from the result's device and the precision setting.
At DEFAULT_K = 1024 the table reads fp32 8.1e-6, tf32 2.0e-3, fp16 3.9e-3, bf16 3.1e-2.
"""
from __future__ import annotations

import math

import torch

C = 4.0
U_ACC = 2.0 ** -24  # fp32 accumulator
DEFAULT_K = 1024  # k=None: an accumulation length at least as long as any test's (tests with longer ones pass k)
ROWS = {  # row: (u_op, u_out)
    "fp32": (2.0 ** -24, 2.0 ** -24),
    "tf32": (2.0 ** -11, 2.0 ** -24),
    "fp32-bf16": (2.0 ** -8, 2.0 ** -24),
    "fp16": (2.0 ** -11, 2.0 ** -11),
    "bf16": (2.0 ** -8, 2.0 ** -8),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def row(dtype: torch.dtype, device=None, *, tf32: bool | None = None) -> str:
    """The precision row of results of `dtype` computed on `device`. fp32: tf32=None follows the device and
    torch's matmul precision (TF32 only on CUDA, and only when the precision is not "highest"); True or False
    forces the tf32 or the exact fp32 row."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype}")
    if dtype != torch.float32:
        return "fp16" if dtype == torch.float16 else "bf16"
    if tf32 is not None:
        return "tf32" if tf32 else "fp32"
    precision = torch.get_float32_matmul_precision()
    if device is None or torch.device(device).type != "cuda" or precision == "highest":
        return "fp32"
    return "tf32" if precision == "high" else "fp32-bf16"


def bound(name: str, k: int | None = None) -> float:
    """C·(u_op + u_acc·sqrt(K) + u_out) for a row and an accumulation length (None: DEFAULT_K)."""
    if name not in ROWS:
        raise ValueError(f"row: expected one of {list(ROWS)}, got {name!r}")
    k = DEFAULT_K if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected an int >= 1 (the accumulation length), got {k!r}")
    u_op, u_out = ROWS[name]
    return C * (u_op + U_ACC * math.sqrt(k) + u_out)


def tol(dtype: torch.dtype, k: int | None = None, *, tf32: bool | None = None, device=None) -> tuple[float, float]:
    """(atol relative to the reference's RMS, rtol) for results of `dtype` that accumulate over `k` terms."""
    b = bound(row(dtype, device, tf32=tf32), k)
    return b, b


# The table at DEFAULT_K, per row: (atol relative to the reference's RMS, rtol)
TOLERANCES = {name: (bound(name), bound(name)) for name in ROWS}


def ratio(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> float:
    """Worst |a - e| / (atol·rms(e) + rtol·|e|) over the elements: <= 1 passes; inf for a wrong shape or a
    non-finite value. `expected` is the float64 reference."""
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    if expected.numel() == 0:
        return 0.0
    exp = expected.detach().to(torch.float64)
    act = actual.detach().to(device=exp.device, dtype=torch.float64)
    if not bool(torch.isfinite(act).all()):
        return math.inf
    rms = float(exp.pow(2).mean().sqrt())
    limit = exp.abs().mul_(rtol).add_(atol * max(rms, 1e-30))
    return float(((act - exp).abs_() / limit).max())


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, k: int | None = None, *,
                tf32: bool | None = None) -> float:
    """ratio() with the tolerance that `dtype`, `k` and actual's device (its precision row) call for."""
    return ratio(actual, expected, *tol(dtype, k, tf32=tf32, device=actual.device))


__all__ = ["C", "U_ACC", "DEFAULT_K", "ROWS", "DTYPES", "TOLERANCES", "row", "bound", "tol", "ratio", "error_ratio"]
