"""Memory claims of LoRALinear as tests: no tensor of out·in elements is ever created (forward, backward, merge,
unmerge), and nothing [M, in]-sized but x itself is saved for backward.

Shapes are chosen so that every legitimate tensor ([M, in], [M, out], [r, in], [out, r]) is far below out·in:
a B·A product or a copy of W0 is the only way to reach it.
"""
import pytest
import torch
from torch import nn

from fastpeft import LoRALinear
from alloc_recorder import AllocRecorder, SavedRecorder
from tolerances import assert_close

from conftest import DEVICE

OUT = IN = 64
M, R = 5, 3
BACKENDS = ["torch", "triton"]


def _layer(dtype=torch.float32, adapter_dtype=None, backend="torch", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(IN, OUT).to(DEVICE, dtype), r=R, alpha=5, dropout=dropout, backend=backend,
                       adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # B non-zero: the adapter term is really computed
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("rows", [1, M])
def test_forward_backward_allocate_nothing_weight_sized(backend, dropout, rows):
    layer = _layer(backend=backend, dropout=dropout).train()
    x = torch.randn(rows, IN, device=DEVICE, requires_grad=True)
    with AllocRecorder() as rec:
        y = layer(x)
        y.backward(torch.randn_like(y))
    assert rec.allocations, "the recorder saw nothing: it cannot be recording"
    rec.assert_below(OUT * IN, f"LoRALinear forward+backward ({backend}, p={dropout}, M={rows})")
    assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_nothing_input_sized_saved_but_x(backend, dropout):
    layer = _layer(backend=backend, dropout=dropout).train()
    x = torch.randn(2, M, IN, device=DEVICE, requires_grad=True)  # 3-D: a reshaped view of x is still x
    with SavedRecorder() as saved:
        y = layer(x)
    assert saved.saved, "nothing saved for backward: the recorder cannot be recording"
    params = [layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B]
    saved.assert_none_shaped_like((2 * M, IN), allow=[x, *params], what=f"LoRALinear ({backend}, p={dropout})")
    y.sum().backward()


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.float16, None),
                                                 (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "fp16", "fp32-over-fp16", "fp32-over-bf16"])
def test_merge_unmerge_allocate_nothing_weight_sized(dtype, adapter_dtype):
    layer = _layer(dtype=dtype, adapter_dtype=adapter_dtype)
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    with AllocRecorder() as rec:
        layer.merge()
    rec.assert_below(OUT * IN, f"merge ({dtype} W0, {layer.lora_A.dtype} adapters)")
    # still exact: one rounding of W0 + s·B·A (accumulated in the adapters' precision) into W0's dtype
    assert_close(layer.base_layer.weight, w0.double() + delta, dtype, "merged W0")
    with AllocRecorder() as rec:
        layer.unmerge()
    rec.assert_below(OUT * IN, f"unmerge ({dtype} W0, {layer.lora_A.dtype} adapters)")
    assert_close(layer.base_layer.weight, w0.double(), dtype, "W0 after unmerge")


def test_merge_of_fp32_adapters_rounds_once_per_element():
    """Row chunks must not change the result: the chunked merge equals a whole-matrix fp32 merge bit for bit."""
    layer = _layer(dtype=torch.float16, adapter_dtype=torch.float32)
    w0 = layer.base_layer.weight.detach().clone()
    expected = torch.addmm(w0.float(), layer.lora_B.detach(), layer.lora_A.detach(), alpha=layer.scaling).half()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, expected)
