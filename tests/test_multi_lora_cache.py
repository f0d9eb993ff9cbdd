"""MultiLoRALinear validates once (ops/call_cache.py): its tensor checks and backend choice run on the first call
and again only when the call's signature changes. Whatever changes a tensor's shape, dtype or device, replaces
the slot buffers or host lists, or changes a setting is checked again (a clear error, never a wrong result);
whatever changes only values (an optimizer step, load_adapter / unload_adapter) is seen on the next call; the
ids are checked on every call. The torch backend runs the op (the cache is the same for every backend).
"""
import copy
import pickle

import pytest
import torch
from torch import nn

from fastpeft.modules.multi_lora import MultiLoRALinear
from tolerances import assert_close


@pytest.fixture
def count_checks(monkeypatch):
    calls = []
    real = MultiLoRALinear._check_tensors

    def counting(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(MultiLoRALinear, "_check_tensors", counting)
    return calls


def _module(in_f=12, out_f=10, n=3, r=4, dtype=torch.float32):
    torch.manual_seed(0)
    m = MultiLoRALinear(nn.Linear(in_f, out_f, dtype=dtype), num_adapters=n, r=r, backend="torch")
    with torch.no_grad():
        m.lora_B.normal_()
    return m


def _expected(m, x, ids):
    """Float64 y: base plus each token's adapter from the module's current slots (empty or -1: base only)."""
    base = m.base_layer
    x2 = x.reshape(-1, x.shape[-1]).double()
    y = x2 @ base.weight.double().t() + base.bias.double()
    for row, a in enumerate(ids.reshape(-1).tolist()):
        if a >= 0 and m.ranks[a] > 0:
            la, lb, s = m.get_adapter(a)
            y[row] += s * (x2[row] @ la.double().t()) @ lb.double().t()
    return y.reshape(*x.shape[:-1], -1)


IDS = torch.tensor([0, 2, -1, 1, 2])


def test_checks_run_once_per_signature(count_checks):
    m = _module()
    x = torch.randn(5, 12)
    for _ in range(3):
        y = m(x, IDS)
    with torch.no_grad():  # inference shares the signature
        m(x, IDS)
    m(torch.randn(2, 5, 12), torch.tensor([1, -1]))  # leading dims and per-sequence ids are not part of it
    assert len(count_checks) == 1
    assert_close(y, _expected(m, x, IDS), torch.float32, "y")


def test_values_changed_in_place_are_seen_without_a_check(count_checks):
    m = _module()
    x = torch.randn(5, 12)
    m(x, IDS)
    opt = torch.optim.SGD([m.lora_A, m.lora_B], lr=0.5)
    m(x, IDS).square().sum().backward()
    opt.step()
    m.load_adapter(1, torch.randn(2, 12), torch.randn(10, 2), scaling=3.0)  # another rank and scaling
    m.unload_adapter(0)
    ids = torch.tensor([1, 2, -1, 1, 2])
    assert_close(m(x, ids), _expected(m, x, ids), torch.float32, "y after a step and a reload")
    assert len(count_checks) == 1
    with pytest.raises(ValueError, match="refers to an empty adapter slot"):  # ids: checked on every call
        m(x, IDS)
    m.check_ids = False  # unchecked: the empty slot means base only
    assert_close(m(x, IDS), _expected(m, x, IDS), torch.float32, "y unchecked")
    with pytest.raises(ValueError, match=r"adapter_ids: expected shape"):
        m(x, IDS[:4])


@pytest.mark.parametrize("change, exc, pattern", [
    (lambda m: setattr(m.lora_B, "data", torch.randn(10, 11)), ValueError, r"lora_b: expected the pool shape \[10, 12\]"),
    (lambda m: setattr(m.lora_A, "data", m.lora_A.data.double()), TypeError, "expected dtype torch.float64"),
    (lambda m: setattr(m.base_layer.bias, "data", torch.randn(9)), ValueError, r"bias: expected shape \[10\]"),
    (lambda m: m.base_layer.half(), TypeError, "weight: expected dtype torch.float32"),
    (lambda m: setattr(m, "backend", "bogus"), ValueError, "backend: expected one of"),
], ids=["pool-shape", "pool-dtype", "bias-shape", "base-dtype", "backend"])
def test_a_change_after_a_valid_call_is_checked_again(change, exc, pattern):
    m = _module()
    x = torch.randn(5, 12)
    m(x, IDS)
    change(m)
    with pytest.raises(exc, match=pattern):
        m(x, IDS)


def test_bad_input_after_a_valid_call_raises_and_leaves_no_cache(count_checks):
    m = _module()
    m(torch.randn(5, 12), IDS)
    with pytest.raises(ValueError, match="x: expected last dimension 12"):
        m(torch.randn(5, 11), IDS)
    assert m._call_cache.key is None
    with pytest.raises(TypeError, match="x: expected dtype in"):
        m(torch.randn(5, 12, dtype=torch.float64), IDS)
    m(torch.randn(5, 12), IDS)  # and the module still works
    assert len(count_checks) == 4


def test_reloaded_state_and_a_cast_module_are_rechecked_and_right(count_checks):
    m = _module()
    x = torch.randn(5, 12)
    m(x, IDS)
    other = _module()
    other.load_adapter(2, torch.randn(3, 12), torch.randn(10, 3), scaling=0.5)
    m.load_state_dict(other.state_dict())  # new host lists (ranks, offsets): a new signature
    assert_close(m(x, IDS), _expected(other, x, IDS), torch.float32, "y after load_state_dict")
    assert len(count_checks) == 2
    m.half()  # adapter_scaling becomes fp16: the table copies it per call, so a later load is still seen
    xh = x.half()
    m(xh, IDS)
    m.load_adapter(0, torch.randn(4, 12).half(), torch.randn(10, 4).half(), scaling=2.0)
    assert_close(m(xh, IDS), _expected(m, xh, IDS), torch.float16, "y of the cast module after a load")
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float32 \(the dtype of x\)"):
        m(x, IDS)


def test_env_backend_is_read_when_the_signature_is_checked(monkeypatch):
    m = MultiLoRALinear(nn.Linear(8, 8), num_adapters=2, r=2)
    monkeypatch.setenv("FASTPEFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$FASTPEFT_BACKEND: expected one of"):
        m(torch.randn(2, 8), torch.tensor([0, 1]))


def test_copies_start_with_an_empty_cache():
    m = _module()
    x = torch.randn(5, 12)
    y = m(x, IDS)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone._call_cache.key is None and clone._call_cache is not m._call_cache
        assert torch.equal(clone(x, IDS), y)
        clone.load_adapter(0, torch.randn(2, 12), torch.randn(10, 2))  # the copy's own slots, not m's
        assert_close(clone(x, IDS), _expected(clone, x, IDS), torch.float32, "copy after a load")
    assert torch.equal(m(x, IDS), y)
