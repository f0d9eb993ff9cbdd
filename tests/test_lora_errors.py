"""Bad input to the LoRA op is rejected before any launch, naming the argument, the expected and the actual."""
import pytest
import torch

import fastpeft
from fastpeft import lora_linear

from conftest import DEVICE


def _ok(dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(5, 8, dtype=dtype), torch.randn(6, 8, dtype=dtype), torch.randn(2, 8, dtype=dtype),
            torch.randn(6, 2, dtype=dtype), torch.randn(6, dtype=dtype))


CASES = {
    "x last dim": (lambda x, w, a, b, bs: dict(x=torch.randn(5, 7)), ValueError, r"x: expected last dimension 8"),
    "A in dim": (lambda x, w, a, b, bs: dict(lora_a=torch.randn(2, 9)), ValueError, r"lora_a: expected shape \[r, 8\]"),
    "B shape": (lambda x, w, a, b, bs: dict(lora_b=torch.randn(6, 3)), ValueError, r"lora_b: expected shape \[6, 2\]"),
    "bias shape": (lambda x, w, a, b, bs: dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \[6\]"),
    "r = 0": (lambda x, w, a, b, bs: dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), ValueError, r"r >= 1"),
    "weight 3-D": (lambda x, w, a, b, bs: dict(weight=torch.randn(1, 6, 8)), ValueError, r"weight: expected a 2-D tensor"),
    "x not a tensor": (lambda x, w, a, b, bs: dict(x=[1.0] * 8), TypeError, r"x: expected a torch.Tensor"),
    "int x": (lambda x, w, a, b, bs: dict(x=torch.ones(5, 8, dtype=torch.int64)), TypeError, r"x: expected dtype in"),
    "weight dtype": (lambda x, w, a, b, bs: dict(weight=w.double()), TypeError, r"weight: expected dtype torch.float32"),
    "A/B dtypes differ": (lambda x, w, a, b, bs: dict(lora_b=b.half()), TypeError, r"lora_b: expected dtype torch.float32"),
    "adapters fp16 over fp32": (lambda x, w, a, b, bs: dict(lora_a=a.half(), lora_b=b.half()), TypeError, r"lora_a: expected dtype"),
    "device": (lambda x, w, a, b, bs: dict(lora_b=torch.empty(6, 2, device="meta")), ValueError, r"lora_b: expected device cpu"),
    "dropout 1": (lambda x, w, a, b, bs: dict(dropout_p=1.0), ValueError, r"dropout_p: expected a probability in \[0, 1\), got 1.0"),
    "dropout negative": (lambda x, w, a, b, bs: dict(dropout_p=-0.1), ValueError, r"dropout_p"),
    "scaling inf": (lambda x, w, a, b, bs: dict(scaling=float("inf")), ValueError, r"scaling: expected a finite number, got inf"),
    "scaling nan": (lambda x, w, a, b, bs: dict(scaling=float("nan")), ValueError, r"scaling: expected a finite number"),
    "scaling tensor": (lambda x, w, a, b, bs: dict(scaling=torch.tensor(2.0)), TypeError, r"scaling: expected a real number"),
    "seed": (lambda x, w, a, b, bs: dict(dropout_p=0.5, seed=-1), ValueError, r"seed: expected an int"),
    "backend name": (lambda x, w, a, b, bs: dict(backend="cuda-magic"), ValueError, r"backend: expected one of"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    make, exc, pattern = CASES[name]
    x, w, a, b, bs = _ok()
    args = dict(x=x, weight=w, lora_a=a, lora_b=b, scaling=2.0, bias=bs)
    args.update(make(x, w, a, b, bs))
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=pattern):
        lora_linear(**args)
    for k, v in before.items():  # nothing written to the caller's tensors
        assert torch.equal(args[k], v), k


def test_env_var_selects_backend(monkeypatch):
    x, w, a, b, bs = _ok()
    monkeypatch.setenv("FASTPEFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$FASTPEFT_BACKEND: expected one of"):
        lora_linear(x, w, a, b, 1.0)
    monkeypatch.setenv("FASTPEFT_BACKEND", "torch")
    torch.testing.assert_close(lora_linear(x, w, a, b, 1.0), x @ w.t() + (x @ a.t()) @ b.t())


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU message")
def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    x, w, a, b, bs = _ok()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastpeft.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        lora_linear(x, w, a, b, 1.0, backend="triton")
    # auto never picks the interpreter: the torch backend runs
    torch.testing.assert_close(lora_linear(x, w, a, b, 1.0), x @ w.t() + (x @ a.t()) @ b.t())


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU message")
def test_cuda_backend_on_cpu_says_why():
    x, w, a, b, bs = _ok()
    with pytest.raises(fastpeft.BackendUnavailableError, match="backend='cuda' cannot run: the CUDA kernels run on CUDA tensors"):
        lora_linear(x, w, a, b, 1.0, backend="cuda")


def test_backend_report_explains_the_choice():
    rep = fastpeft.backend_report("cpu")
    assert rep["available"]["torch"] and not rep["available"]["cuda"]
    assert rep["auto"]["lora_linear"] == "torch" and "cuda" in rep["why_not"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_in_features_is_a_clear_error(backend):
    x, w, a, b = torch.randn(5, 0), torch.randn(6, 0), torch.randn(2, 0), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"x: expected in_features >= 1 .*got x of shape \(5, 0\)"):
        lora_linear(x, w, a, b, 1.0, backend=backend)
