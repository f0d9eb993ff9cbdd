"""The one table of tolerances, per dtype, for comparing against a float64 reference.

Derivation: outputs are rounded once to the dtype (unit roundoff u: fp32 2**-24, fp16 2**-11, bf16 2**-8)
after fp32 accumulation of K products of inputs that were themselves rounded to the dtype. With inputs of
unit scale the relative error of a dot product of length K is bounded by about 2u·sqrt(K) in practice
(random rounding errors), and the GPU's TF32 products (u = 2**-11) set the fp32 row: the interpreter
computes fp32 exactly, so the fp32 bound holds with room to spare there. The reference is computed in
float64 from the same dtype-rounded inputs, so only the kernel's own rounding is measured.
Compare with `assert_close(actual, expected_float64, dtype)`: |a - e| <= atol + rtol·|e| elementwise,
where atol is scaled by the expected tensor's RMS so that it is relative to the data, not absolute.
"""
import torch

# dtype: (atol relative to the reference's RMS, rtol)
TOLERANCES = {
    torch.float32: (2e-3, 2e-3),  # TF32 on GPU (10-bit mantissa); exact fp32 under the interpreter
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

DTYPES = list(TOLERANCES)


def tol(dtype):
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    atol_rel, rtol = TOLERANCES[dtype]
    exp = expected.detach().to(torch.float64).cpu()
    act = actual.detach().to(torch.float64).cpu()
    assert act.shape == exp.shape, f"{what}: shape {tuple(act.shape)} != expected {tuple(exp.shape)}"
    assert torch.isfinite(act).all(), f"{what}: non-finite values in the result"
    scale = exp.pow(2).mean().sqrt().item() if exp.numel() else 0.0
    torch.testing.assert_close(act, exp, atol=atol_rel * max(scale, 1e-30), rtol=rtol, msg=lambda m: f"{what} ({dtype}): {m}")
