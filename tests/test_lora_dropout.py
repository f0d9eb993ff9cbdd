"""The seeded dropout of the LoRA op: one stream for every backend, the forward's mask reused in backward."""
import pytest
import torch

from fastpeft import lora_linear
from fastpeft.dropout import dropout_keep_mask, keep_threshold

from conftest import DEVICE


def _identity_shrink_mask(seed, rows, cols, p):
    """Read the Triton kernels' mask off the shrink kernel: with A = I, S = dropout(x) exactly."""
    from fastpeft.kernels.lora_linear import lora_shrink

    x = torch.rand(rows, cols, device=DEVICE) + 0.5  # never zero, so S == 0 exactly where dropped
    s = lora_shrink(x, torch.eye(cols, device=DEVICE), p, seed, keep_threshold(p))
    kept = s != 0
    torch.testing.assert_close(s[kept], (x / (1 - p))[kept])
    return kept


@pytest.mark.parametrize("rows,cols,p,seed", [(21, 48, 0.3, 7), (5, 16, 0.9, 2**31 - 2), (33, 32, 0.05, 0)])
def test_triton_mask_is_bit_identical_to_the_pytorch_twin(rows, cols, p, seed):
    kept = _identity_shrink_mask(seed, rows, cols, p)
    assert torch.equal(kept.cpu(), dropout_keep_mask(seed, rows, cols, p))


def test_keep_rate_matches_one_minus_p():
    for p in (0.1, 0.5):
        keep = dropout_keep_mask(123, 1000, 1003, p)
        n = keep.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
        # no structure along rows or columns: each row's and column's keep rate is plausible
        assert keep.float().mean(1).std().item() < 5 * (p * (1 - p) / 1003) ** 0.5
        assert keep.float().mean(0).std().item() < 5 * (p * (1 - p) / 1000) ** 0.5


def test_different_seeds_differ_and_same_seed_repeats():
    a = dropout_keep_mask(1, 64, 64, 0.5)
    assert torch.equal(a, dropout_keep_mask(1, 64, 64, 0.5))
    assert (a != dropout_keep_mask(2, 64, 64, 0.5)).float().mean() > 0.3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_and_backward_use_one_mask(backend):
    """dA = dSᵀ·dropout(x): with the mask of a different seed the gradient would not match."""
    torch.manual_seed(0)
    x = torch.randn(19, 24, device=DEVICE)
    w = torch.randn(12, 24, device=DEVICE)
    a = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    b = torch.randn(12, 4, device=DEVICE, requires_grad=True)
    y = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, seed=99, backend=backend)
    y.sum().backward()
    keep = dropout_keep_mask(99, 19, 24, 0.5).to(DEVICE)
    xd = torch.where(keep, x * 2, torch.zeros_like(x))
    ds = torch.ones(19, 12, device=DEVICE) @ b.detach()
    torch.testing.assert_close(a.grad, ds.t() @ xd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, x @ w.t() + (xd @ a.detach().t()) @ b.detach().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_dropout_at_p0_or_in_eval(backend):
    torch.manual_seed(1)
    x = torch.randn(9, 20, device=DEVICE)
    w, a, b = torch.randn(7, 20, device=DEVICE), torch.randn(3, 20, device=DEVICE), torch.randn(7, 3, device=DEVICE)
    ref = x @ w.t() + 0.5 * (x @ a.t()) @ b.t()
    for y in (lora_linear(x, w, a, b, 0.5, dropout_p=0.0, backend=backend),
              lora_linear(x, w, a, b, 0.5, dropout_p=0.7, training=False, backend=backend)):
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y1 = lora_linear(x, w, a, b, 0.5, dropout_p=0.7, seed=1, backend=backend)
    y2 = lora_linear(x, w, a, b, 0.5, dropout_p=0.7, seed=2, backend=backend)
    assert not torch.allclose(y1, y2)


def test_unseeded_calls_follow_torch_manual_seed():
    x = torch.randn(6, 16)
    w, a, b = torch.randn(5, 16), torch.randn(2, 16), torch.randn(5, 2)
    torch.manual_seed(3)
    y1 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, backend="torch")
    torch.manual_seed(3)
    y2 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, backend="torch")
    y3 = lora_linear(x, w, a, b, 1.0, dropout_p=0.5, backend="torch")
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)
