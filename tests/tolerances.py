"""The tests' tolerances: the one table of fastpeft/bench/tolerances.py (its docstring derives it), and
`assert_close(actual, expected_float64, dtype, what, k=None)`: |a - e| <= atol·rms(e) + rtol·|e| elementwise,
with (atol, rtol) = tol(dtype, k) for the row of actual's device (exact fp32 on the CPU and under the
interpreter; TF32 on CUDA only when torch's matmul precision allows it). `k` is the longest accumulation in
the result (in_features for y, out_features for dX, the rows for a weight gradient); None means
DEFAULT_K (1024), longer than any test shape here.
"""
import torch

from fastpeft.bench.tolerances import DEFAULT_K, DTYPES, ROWS, TOLERANCES, bound, error_ratio, row, tol

DTYPES = list(DTYPES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 k: int | None = None) -> None:
    atol_rel, rtol = tol(dtype, k, device=actual.device)
    exp = expected.detach().to(torch.float64).cpu()
    act = actual.detach().to(torch.float64).cpu()
    assert act.shape == exp.shape, f"{what}: shape {tuple(act.shape)} != expected {tuple(exp.shape)}"
    assert torch.isfinite(act).all(), f"{what}: non-finite values in the result"
    scale = exp.pow(2).mean().sqrt().item() if exp.numel() else 0.0
    name = row(dtype, actual.device)
    torch.testing.assert_close(act, exp, atol=atol_rel * max(scale, 1e-30), rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}, row {name}, bound {atol_rel:.3g}): {m}")


__all__ = ["DEFAULT_K", "DTYPES", "ROWS", "TOLERANCES", "assert_close", "bound", "error_ratio", "row", "tol"]
