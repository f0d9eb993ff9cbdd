"""Float64 reference of the LoRA linear, written from the math with autograd, no fastpeft op code."""
import torch

from fastpeft.dropout import dropout_keep_mask


def lora_reference(x, weight, lora_a, lora_b, bias, scaling, p=0.0, seed=0):
    """Returns (y, grads) in float64 for dy = `dy` later: use reference_with_grads."""
    x64 = x.detach().to(torch.float64)
    keep = dropout_keep_mask(seed, x64.reshape(-1, x64.shape[-1]).shape[0], x64.shape[-1], p).reshape(x64.shape) if p > 0 else None
    xd = x64 * keep / (1 - p) if keep is not None else x64
    y = x64 @ weight.detach().double().t() + scaling * (xd @ lora_a.detach().double().t()) @ lora_b.detach().double().t()
    if bias is not None:
        y = y + bias.detach().double()
    return y


def reference_with_grads(x, weight, lora_a, lora_b, bias, scaling, dy, p=0.0, seed=0):
    """Float64 forward and the gradients of <y, dy> w.r.t. x, weight, lora_a, lora_b, bias."""
    leaves = [t.detach().to(torch.float64).requires_grad_(True) if t is not None else None for t in (x, weight, lora_a, lora_b, bias)]
    x64, w64, a64, b64, bias64 = leaves
    rows = x64.reshape(-1, x64.shape[-1]).shape[0]
    if p > 0:
        keep = dropout_keep_mask(seed, rows, x64.shape[-1], p).reshape(x64.shape).to(torch.float64)
        xd = x64 * keep / (1 - p)
    else:
        xd = x64
    y = x64 @ w64.t() + scaling * ((xd @ a64.t()) @ b64.t())
    if bias64 is not None:
        y = y + bias64
    y.backward(dy.detach().to(torch.float64))
    grads = [t.grad if t is not None else None for t in leaves]
    return y.detach(), grads
