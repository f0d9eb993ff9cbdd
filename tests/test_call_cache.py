"""The validate-once hot path (fastpeft/ops/lora_linear_cached.py) of LoRALinear and patch_peft layers.

A layer's checks run on its first call and again only when the call's signature changes; whatever changes a
parameter's shape, dtype or device, or the layer's settings, must be checked again (a clear error, never a
silently wrong result), and whatever changes only values (an optimizer step, a parameter swapped for one of
the same kind) must be seen on the next call.
"""
import copy
import pickle

import pytest
import torch
from torch import nn

import fastpeft
import fastpeft.ops.lora_linear_cached as cached
from reference_lora import lora_reference
from tolerances import assert_close


@pytest.fixture
def count_validations(monkeypatch):
    calls = []
    real = cached._validate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cached, "_validate", counting)
    return calls


def _layer(in_f=24, out_f=20, r=4, bias=True, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    layer = fastpeft.LoRALinear(nn.Linear(in_f, out_f, bias=bias, dtype=dtype), r=r, alpha=2 * r, dropout=dropout,
                                backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _expected(layer, x):
    base = layer.base_layer
    return lora_reference(x, base.weight, layer.lora_A, layer.lora_B, base.bias, layer.scaling)


def test_checks_run_once_per_signature(count_validations):
    layer = _layer()
    x = torch.randn(5, 24)
    for _ in range(4):
        y = layer(x)
    assert len(count_validations) == 1
    assert_close(y, _expected(layer, x), torch.float32, "y")
    with torch.no_grad():  # inference shares the signature
        layer(x)
    layer(torch.randn(2, 3, 24))  # leading dims are not part of it
    assert len(count_validations) == 1
    layer(x.double().float().half().float())  # same dtype again
    assert len(count_validations) == 1


def test_values_changed_in_place_are_seen_without_a_check(count_validations):
    layer = _layer()
    x = torch.randn(3, 24)
    layer(x)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        layer.base_layer.weight.mul_(-1.5)
    assert_close(layer(x), _expected(layer, x), torch.float32, "y after a step")
    assert len(count_validations) == 1


def test_a_parameter_replaced_by_one_of_the_same_kind_is_used(count_validations):
    layer = _layer()
    x = torch.randn(3, 24)
    layer(x)
    layer.lora_B = nn.Parameter(torch.randn(20, 4))
    layer.base_layer.weight = nn.Parameter(torch.randn(20, 24), requires_grad=False)
    assert_close(layer(x), _expected(layer, x), torch.float32, "y with new parameters")


@pytest.mark.parametrize("change, exc, pattern", [
    (lambda l: setattr(l.lora_A, "data", torch.randn(3, 24)), ValueError, r"lora_b: expected shape \[20, 3\]"),
    (lambda l: setattr(l.lora_A, "data", l.lora_A.data[:3]), ValueError, r"lora_b: expected shape \[20, 3\]"),
    (lambda l: setattr(l.lora_B, "data", torch.randn(20, 4, dtype=torch.float64)), TypeError, "lora_b: expected dtype"),
    (lambda l: setattr(l.base_layer.bias, "data", torch.randn(19)), ValueError, r"bias: expected shape \[20\]"),
    (lambda l: l.base_layer.to(torch.float16), TypeError, "weight: expected dtype torch.float32"),
    (lambda l: setattr(l, "scaling", float("inf")), ValueError, "scaling: expected a finite number"),
    (lambda l: setattr(l, "lora_dropout", 1.5), ValueError, r"dropout_p: expected a probability in \[0, 1\)"),
    (lambda l: setattr(l, "backend", "bogus"), ValueError, "backend: expected one of"),
], ids=["rank", "rank-same-storage", "adapter-dtype", "bias-shape", "base-dtype", "scaling", "dropout", "backend"])
def test_a_change_after_a_valid_call_is_checked_again(change, exc, pattern):
    layer = _layer()
    x = torch.randn(3, 24)
    layer(x)
    change(layer)
    with pytest.raises(exc, match=pattern):
        layer(x)


def test_the_whole_module_cast_is_checked_and_runs():
    layer = _layer()
    x = torch.randn(3, 24)
    layer(x)
    layer.half()
    xh = x.half()
    assert_close(layer(xh), _expected(layer, xh), torch.float16, "y after .half()")
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32 \(the dtype of x\)"):
        layer(x)  # fp32 input into the fp16 layer


@pytest.mark.parametrize("bad, exc, pattern", [
    (lambda: torch.randn(3, 23), ValueError, "x: expected last dimension 24"),
    (lambda: torch.randn(3, 24, dtype=torch.float64), TypeError, "x: expected dtype in"),
    (lambda: torch.randn(3, 24).half(), TypeError, "weight: expected dtype torch.float16"),
])
def test_bad_input_after_a_valid_call_raises(bad, exc, pattern):
    layer = _layer()
    layer(torch.randn(3, 24))
    with pytest.raises(exc, match=pattern):
        layer(bad())
    layer(torch.randn(2, 24))  # and the layer still works


def test_a_failed_check_leaves_no_cache(count_validations):
    layer = _layer()
    with pytest.raises(ValueError):
        layer(torch.randn(3, 23))
    assert layer._call_cache.key is None
    layer(torch.randn(3, 24))
    assert len(count_validations) == 2


def test_env_backend_is_read_when_the_signature_is_checked(monkeypatch):
    layer = fastpeft.LoRALinear(nn.Linear(8, 8), r=2)
    monkeypatch.setenv("FASTPEFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$FASTPEFT_BACKEND: expected one of"):
        layer(torch.randn(2, 8))


def test_copies_start_with_an_empty_cache():
    layer = _layer()
    x = torch.randn(3, 24)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._call_cache.key is None and clone._call_cache is not layer._call_cache
        assert torch.equal(clone(x), y)


def test_parametrized_base_weight_is_read_through_getattr():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = _layer()
    x = torch.randn(3, 24)
    layer(x)
    parametrize.register_parametrization(layer.base_layer, "weight", Double())
    base = layer.base_layer
    expected = lora_reference(x, base.weight, layer.lora_A, layer.lora_B, base.bias, layer.scaling)
    assert_close(layer(x), expected, torch.float32, "y with a parametrized weight")


def test_functional_call_uses_the_given_parameters():
    layer = _layer()
    x = torch.randn(3, 24)
    layer(x)
    new_b = torch.randn(20, 4)
    y = torch.func.functional_call(layer, {"lora_B": new_b}, (x,))
    base = layer.base_layer
    assert_close(y, lora_reference(x, base.weight, layer.lora_A, new_b, base.bias, layer.scaling), torch.float32, "y")


def test_autocast_takes_the_casting_path_every_call():
    layer = _layer()
    x = torch.randn(3, 24)
    layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32


def test_patched_peft_layer_checks_once_and_falls_back_on_a_dtype_change(count_validations):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 24)
    expected = layer(x)
    fastpeft.patch_peft(pm, backend="torch")
    for _ in range(3):
        assert_close(layer(x), expected.double(), torch.float32, "patched y")
    assert len(count_validations) == 1
    for lin in (layer.lora_A["default"], layer.lora_B["default"]):
        lin.weight.data = lin.weight.data.double()
    with pytest.warns(UserWarning, match="run on PEFT's path"):
        y = layer(x)  # PEFT casts; fastpeft hands the call back to it rather than fail or compute wrongly
    fastpeft.unpatch_peft(pm)
    assert torch.equal(y, layer(x))


def test_patched_peft_layer_sees_a_new_adapter():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(24, 20)), peft.LoraConfig(r=4, target_modules=["0"]))
    fastpeft.patch_peft(pm, backend="torch")
    layer = pm.base_model.model[0]
    x = torch.randn(3, 24)
    layer(x)
    pm.add_adapter("other", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["0"], lora_bias=True))
    pm.set_adapter("other")
    with pytest.warns(UserWarning, match="lora_bias=True"):
        y = layer(x)
    fastpeft.unpatch_peft(pm)
    assert torch.equal(y, layer(x))


# ---- the same for the adapter and IA3 modules (fastpeft/ops/call_cache.py) ----------------------------------
def _count(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_ia3_module_checks_once_and_again_after_a_change(monkeypatch):
    import fastpeft.ops.ia3 as ia3_ops

    calls = _count(monkeypatch, ia3_ops, "check_ia3_inputs")
    layer = fastpeft.IA3Linear(nn.Linear(12, 10), scale="output", backend="torch")
    with torch.no_grad():
        layer.ia3_scale.uniform_(0.5, 1.5)
    x = torch.randn(3, 12)
    y = layer(x)
    for _ in range(3):
        assert torch.equal(layer(x), y)
    assert len(calls) == 1
    expected = (x.double() @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double()) * layer.ia3_scale.double()
    assert_close(y, expected, torch.float32, "ia3 y")
    layer.ia3_scale.data = torch.ones(12)
    with pytest.raises(ValueError, match=r"scale: expected shape \[10\]"):
        layer(x)
    assert copy.deepcopy(layer)._call_cache.key is None


def test_adapter_module_checks_once_and_again_after_a_change(monkeypatch):
    import fastpeft.ops.adapter as adapter_ops

    calls = _count(monkeypatch, adapter_ops, "check_adapter_inputs")
    ad = fastpeft.BottleneckAdapter(16, 4, activation="relu", scaling=0.5, backend="torch")
    with torch.no_grad():
        ad.up_weight.normal_()
    h = torch.randn(2, 5, 16)
    y = ad(h)
    ad(torch.randn(7, 16))
    assert len(calls) == 1
    z = torch.relu(h.double() @ ad.down_weight.double().t() + ad.down_bias.double())
    assert_close(y, h.double() + 0.5 * (z @ ad.up_weight.double().t() + ad.up_bias.double()), torch.float32, "y")
    with pytest.raises(ValueError, match="residual: expected shape"):  # checked on every call: it follows h
        ad(h, torch.randn(2, 4, 16))
    ad.scaling = float("nan")
    with pytest.raises(ValueError, match="scaling: expected a finite number"):
        ad(h)
    ad.scaling = 0.5
    ad.up_weight.data = torch.randn(16, 3)
    with pytest.raises(ValueError, match=r"up_w: expected shape \[16, 4\]"):
        ad(h)
    assert pickle.loads(pickle.dumps(ad))._call_cache.key is None
