"""LoRALinear: PEFT's init, names and scaling; merge/unmerge; parity with HF PEFT's LoraLayer."""
import math

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import LoRALinear
from tolerances import assert_close

from conftest import DEVICE

BACKENDS = ["torch", "triton"]


def _linear(i=40, o=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o, bias=bias).to(DEVICE, dtype)


def test_init_names_and_freezing():
    base = _linear()
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1)
    assert layer.base_layer is base
    assert layer.lora_A.shape == (4, 40) and layer.lora_B.shape == (24, 4)
    assert isinstance(layer.lora_A, nn.Parameter) and isinstance(layer.lora_B, nn.Parameter)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(40)  # kaiming-uniform with a=√5 on fan_in = in_features, PEFT's default
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0.4 * bound
    assert layer.scaling == 2.0
    assert LoRALinear(_linear(), r=16, alpha=8, use_rslora=True).scaling == 8 / 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_starts_equal_to_base_and_trains_only_adapters(backend):
    base = _linear()
    layer = LoRALinear(base, r=4, alpha=8, backend=backend)
    x = torch.randn(3, 5, 40, device=DEVICE)
    torch.testing.assert_close(layer(x), base(x))
    layer(x).square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_B.grad is not None and torch.count_nonzero(layer.lora_B.grad) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_unmerge_round_trip(backend, dtype):
    base = _linear(dtype=dtype)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=6, alpha=12, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 40, device=DEVICE, dtype=dtype)
    layer.eval()
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    expected_w = w0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    assert_close(base.weight, expected_w, dtype, "merged W0")
    assert_close(layer(x), y_unmerged.double(), dtype, "merged forward")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(base.weight, w0.double(), dtype, "W0 after unmerge")
    if dtype == torch.float32:
        torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_fp32_adapters_over_fp16_base_merge():
    base = _linear(dtype=torch.float16)
    layer = LoRALinear(base, r=4, alpha=4, adapter_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = base.weight.detach().clone()
    layer.merge()
    assert_close(base.weight, w0.double() + (layer.lora_B.double() @ layer.lora_A.double()), torch.float16, "W0")


@pytest.mark.parametrize("bad,exc,match", [
    (dict(r=0), ValueError, r"r: expected an int >= 1, got 0"),
    (dict(r=2.5), TypeError, r"r: expected an int"),
    (dict(dropout=1.0), ValueError, r"dropout: expected a probability"),
    (dict(alpha=float("nan")), ValueError, r"alpha: expected a finite number"),
    (dict(adapter_dtype=torch.float16), TypeError, r"adapter_dtype"),
])
def test_bad_arguments(bad, exc, match):
    with pytest.raises(exc, match=match):
        LoRALinear(_linear(), **bad)
    with pytest.raises(TypeError, match="base_layer: expected an nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hf_peft_lora_layer(backend):
    """Same weights in PEFT's LoraLayer and in LoRALinear: same output and same adapter gradients."""
    peft = pytest.importorskip("peft")

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _linear()

    for use_rslora in (False, True):
        ref = peft.get_peft_model(One(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["proj"], lora_dropout=0.0,
                                                         use_rslora=use_rslora, init_lora_weights=True))
        lora_layer = ref.base_model.model.proj
        with torch.no_grad():
            lora_layer.lora_B["default"].weight.normal_()
        mine = LoRALinear(_linear(), r=4, alpha=12, use_rslora=use_rslora, backend=backend)
        with torch.no_grad():
            mine.lora_A.copy_(lora_layer.lora_A["default"].weight)
            mine.lora_B.copy_(lora_layer.lora_B["default"].weight)
        x = torch.randn(6, 40, device=DEVICE)
        y_ref, y = lora_layer(x), mine(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        y_ref.square().sum().backward()
        y.square().sum().backward()
        torch.testing.assert_close(mine.lora_A.grad, lora_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.lora_B.grad, lora_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)
        assert mine.scaling == lora_layer.scaling["default"]


def test_count_parameters_counts_shared_once():
    model = nn.Sequential(_linear(8, 8), nn.ReLU(), _linear(8, 8))
    model[2].weight = model[0].weight
    trainable, total = fastpeft.count_parameters(model)
    assert total == 64 + 8 + 8 and trainable == total
    model[0].bias.requires_grad_(False)
    assert fastpeft.count_parameters(model) == (72, 80)


@pytest.mark.parametrize("in_f,out_f", [(0, 24), (40, 0)])
def test_empty_base_layer_is_refused(in_f, out_f):
    with pytest.raises(ValueError, match=rf"base_layer: expected an nn.Linear with in_features >= 1 and "
                                         rf"out_features >= 1, got in_features={in_f}, out_features={out_f}"):
        LoRALinear(nn.Linear(in_f, out_f), r=2)


def _round_trips(layer):
    """Copies of `layer` made every way a user makes them."""
    import copy
    import io
    import pickle

    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    fresh = LoRALinear(_linear(layer.in_features, layer.out_features, seed=99), r=layer.r, alpha=layer.lora_alpha,
                       dropout=layer.lora_dropout, use_rslora=layer.use_rslora, backend=layer.backend)
    fresh.load_state_dict(layer.state_dict())
    return {"deepcopy": copy.deepcopy(layer), "pickle": pickle.loads(pickle.dumps(layer)),
            "torch.save": torch.load(buf, weights_only=False), "state_dict": fresh}


def _train_steps(layer, x, steps=3):
    """Outputs and gradients of a few SGD steps, with dropout drawn from the global generator."""
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    record = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        y = layer(x)
        y.square().sum().backward()
        record.append((y.detach().clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return record


@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_train_identically(backend):
    layer = LoRALinear(_linear(), r=3, alpha=7, dropout=0.2, use_rslora=True, backend=backend).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 40, device=DEVICE)
    copies = _round_trips(layer)
    expected = _train_steps(layer, x)
    for how, clone in copies.items():
        assert type(clone) is LoRALinear and clone.backend == backend and clone.scaling == layer.scaling, how
        assert not clone.base_layer.weight.requires_grad and clone.lora_A.requires_grad, how
        got = _train_steps(clone.train(), x)
        for step, (a, b) in enumerate(zip(got, expected)):
            for name, u, v in zip(("y", "dA", "dB"), a, b):
                assert torch.equal(u, v), f"{how}: step {step}: {name} differs from the original's"
