"""QLoRA in the modules: LoRALinear over a bitsandbytes Linear4bit, inject_lora on a 4-bit model, patch_peft on
PEFT's lora.bnb.Linear4bit, adapter files, and the validate-once cache of the packed weight.

Against the float64 reference of tests/test_qlora.py (bitsandbytes' own generic dequantize) and PEFT +
bitsandbytes on the CPU, on shapes where bitsandbytes' CPU dequantize is right (odd in_features, or a multiple of
the blocksize: see tests/test_qlora.py's docstring).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import fastpeft  # noqa: E402
from fastpeft import LoRALinear, inject_lora  # noqa: E402
from fastpeft.modules.lora import QLoRALinear  # noqa: E402
from fastpeft.peft_compat import is_patched, patch_peft, unpatch_peft  # noqa: E402
from conftest import DEVICE  # noqa: E402
from tolerances import assert_close  # noqa: E402
from test_qlora import _peft_qlora, _quantized, _ref_deq  # noqa: E402


def _base4(packed, st, bias=None, compute_dtype=torch.float32):
    """A bnb.nn.Linear4bit holding exactly (packed, st)."""
    n, k = st.shape
    base = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=compute_dtype, quant_type=st.quant_type,
                             compress_statistics=st.nested, device=DEVICE)
    base.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=st, quant_type=st.quant_type,
                                    blocksize=st.blocksize, compress_statistics=st.nested, bnb_quantized=True,
                                    module=base)
    if bias is not None:
        base.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return base


def _fastpeft_warnings(rec):
    return [str(w.message) for w in rec if "fastpeft" in str(w.message)]


# ------------------------------------------------------------------------------------- LoRALinear


CASES = [  # (lead, out, in), quant type, blocksize, double quantization, compute dtype, backend
    ((5,), 37, 53, "nf4", 64, False, torch.float32, "torch"),
    ((2, 3), 33, 128, "fp4", 128, True, torch.float32, "triton"),
    ((1,), 24, 128, "nf4", 128, True, torch.float16, "torch"),
    ((4,), 20, 64, "fp4", 64, False, torch.float16, "triton"),
]


@pytest.mark.parametrize("lead,n,k,quant_type,blocksize,double,dtype,backend", CASES,
                         ids=[f"{c[3]}-bs{c[4]}-{'dq' if c[5] else 'plain'}-{str(c[6])[6:]}-{c[7]}" for c in CASES])
def test_lora_linear_matches_peft_bnb(lead, n, k, quant_type, blocksize, double, dtype, backend):
    g = torch.Generator().manual_seed(11)
    packed, st = _quantized(n, k, quant_type, blocksize, double)
    r, alpha = 4, 8
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    a = (torch.randn(r, k, generator=g) * 0.2).to(DEVICE, dtype)
    b = (torch.randn(n, r, generator=g) * 0.2).to(DEVICE, dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).float().to(DEVICE)  # representable in the compute dtype
    dy = torch.randn(*lead, n, generator=g).to(DEVICE, dtype)

    w64 = _ref_deq(packed, st, dtype).double()
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w64.t() + bias.double() + (alpha / r) * (x64 @ a64.t()) @ b64.t()
    y64.backward(dy.double())
    ref = (y64, x64.grad, a64.grad, b64.grad)
    m = x.numel() // k

    def check(got, who):
        for name, gt, rf, kk in zip(("y", "dx", "dA", "dB"), got, ref, (k, n, m, m)):
            assert_close(gt, rf, dtype, f"{who} {name}", k=max(kk, 16))

    layer = LoRALinear(_base4(packed, st, bias, dtype), r=r, alpha=alpha, backend=backend)
    assert type(layer) is QLoRALinear and isinstance(layer, LoRALinear)
    assert layer.lora_A.dtype == dtype and (layer.in_features, layer.out_features) == (k, n)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    xs = x.clone().requires_grad_()
    y = layer(xs)
    assert y.dtype == dtype
    y.backward(dy)
    check((y, xs.grad, layer.lora_A.grad, layer.lora_B.grad), f"fastpeft[{backend}]")
    assert layer.base_layer.weight.grad is None

    pm, player = _peft_qlora(packed, st, bias, a, b, alpha, dtype)
    xp = x.clone().requires_grad_()
    yp = pm(xp)
    yp.backward(dy)
    check((yp, xp.grad, player.lora_A["default"].weight.grad, player.lora_B["default"].weight.grad), "peft+bnb")


def test_input_dtype_other_than_compute_dtype():
    """x in fp32 over an fp16 compute dtype: computed in fp16 as bitsandbytes does, returned in fp32 as PEFT does."""
    g = torch.Generator().manual_seed(12)
    n, k, r = 24, 64, 4
    packed, st = _quantized(n, k, "nf4", 64, True)
    x = torch.randn(6, k, generator=g).to(DEVICE)
    layer = LoRALinear(_base4(packed, st, None, torch.float16), r=r, alpha=8, backend="torch")
    nn.init.normal_(layer.lora_B, std=0.2)
    pm, _ = _peft_qlora(packed, st, None, layer.lora_A.detach(), layer.lora_B.detach(), 8, torch.float16)
    with torch.no_grad():
        y, yp = layer(x), pm(x)
    assert y.dtype == yp.dtype == torch.float32
    assert_close(y, yp.double(), torch.float16, "fp32 input, fp16 compute", k=k)


def test_no_compute_dtype_takes_the_first_input():
    packed, st = _quantized(20, 53, "fp4", 64, False)
    base = _base4(packed, st, None, None)
    layer = LoRALinear(base, r=2, backend="torch")
    assert layer.lora_A.dtype == torch.float32
    y = layer(torch.randn(3, 53).to(DEVICE))
    assert y.dtype == torch.float32 and base.compute_dtype == torch.float32  # as bitsandbytes sets it


def test_merge_unmerge_raise():
    packed, st = _quantized(16, 64, "nf4", 64, False)
    layer = LoRALinear(_base4(packed, st), r=2)
    with pytest.raises(NotImplementedError, match="4-bit"):
        layer.merge()
    with pytest.raises(NotImplementedError, match="4-bit"):
        layer.unmerge()
    assert not layer.merged
    sd = layer.state_dict()
    sd["_extra_state"] = torch.tensor([True])
    with pytest.raises(ValueError, match="never merged"):
        layer.load_state_dict(sd)
    assert not layer.merged


def test_validate_once_and_rebuilt_when_the_quant_state_changes(monkeypatch):
    from fastpeft.ops import qlora_linear_cached as qc

    calls = []
    real = qc.quant4
    monkeypatch.setattr(qc, "quant4", lambda w, s: calls.append(1) or real(w, s))
    packed, st = _quantized(24, 64, "nf4", 64, True)
    base = _base4(packed, st)
    layer = LoRALinear(base, r=2, backend="torch")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 64).to(DEVICE)
    with torch.no_grad():
        y1 = layer(x)
        layer(x)
        layer(x)
    assert len(calls) == 1
    q1 = layer._call_cache.q
    # re-quantize: a new packed weight and QuantState (fp4 now)
    packed2, st2 = _quantized(24, 64, "fp4", 64, False, seed=5)
    base.weight = bnb.nn.Params4bit(packed2, requires_grad=False, quant_state=st2, quant_type="fp4", blocksize=64,
                                    compress_statistics=False, bnb_quantized=True, module=base)
    with torch.no_grad():
        y2 = layer(x)
        layer(x)
    assert len(calls) == 2 and layer._call_cache.q is not q1 and layer._call_cache.q.quant_type == "fp4"
    w2 = _ref_deq(packed2, st2, torch.float32)
    ref = x @ w2.t() + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert_close(y2, ref.double(), torch.float32, "after re-quantization", k=64)
    assert not torch.allclose(y1, y2)
    # a new QuantState object on the same packed bytes is checked again too
    base.weight.quant_state = copy.copy(st2)
    with torch.no_grad():
        layer(x)
    assert len(calls) == 3
    # a copy starts with an empty cache
    assert copy.deepcopy(layer)._call_cache.key is None


# ------------------------------------------------------------------------------------- bad input


def test_bad_bases_give_clear_errors():
    packed, st = _quantized(16, 64, "nf4", 64, False)
    base = _base4(packed, st, torch.zeros(16))
    base.bias = nn.Parameter(torch.zeros(16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="quantized bias"):
        LoRALinear(base, r=2)
    bad = copy.copy(st)
    bad.quant_type = "int4"
    base = _base4(packed, bad)
    with pytest.raises(ValueError, match="quant_type"):
        LoRALinear(base, r=2)
    with pytest.raises(TypeError, match="compute"):
        LoRALinear(_base4(packed, st, None, torch.float64), r=2)
    with pytest.raises(NotImplementedError, match="QDoRA"):
        LoRALinear(_base4(packed, st), r=2, use_dora=True)
    with pytest.raises(TypeError, match="adapter_dtype"):
        LoRALinear(_base4(packed, st, None, torch.float16), r=2, adapter_dtype=torch.bfloat16)
    # an fp64 input over a layer without compute dtype: the kernels do not compute in fp64
    layer = LoRALinear(_base4(packed, st, None, None), r=2)
    with pytest.raises(TypeError, match="compute dtype"):
        layer(torch.randn(2, 64, dtype=torch.float64).to(DEVICE))


# ------------------------------------------------------------------------------------- inject_lora, files


def _model4(seed=0, compute_dtype=torch.float32):
    """A small float model and its 4-bit copy (every Linear a bnb Linear4bit, NF4, double quantization)."""
    torch.manual_seed(seed)
    fm = nn.Sequential(nn.Linear(53, 37), nn.ReLU(), nn.Linear(37, 24, bias=False))
    qm = nn.Sequential(bnb.nn.Linear4bit(53, 37, compute_dtype=compute_dtype, quant_type="nf4"), nn.ReLU(),
                       bnb.nn.Linear4bit(37, 24, bias=False, compute_dtype=compute_dtype, quant_type="nf4"))
    qm.load_state_dict(fm.state_dict())
    return qm.to(DEVICE)  # quantizes


def test_inject_lora_on_a_4bit_model():
    qm = _model4()
    inject_lora(qm, ["0", "2"], r=4, alpha=8, backend="torch")
    assert type(qm[0]) is QLoRALinear and type(qm[2]) is QLoRALinear
    trainable = {n for n, p in qm.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    for layer in (qm[0], qm[2]):
        nn.init.normal_(layer.lora_B, std=0.2)
    # the same model in float: dequantized W0 in nn.Linear, the same adapters
    fm = nn.Sequential(nn.Linear(53, 37), nn.ReLU(), nn.Linear(37, 24, bias=False)).to(DEVICE)
    with torch.no_grad():
        for i in (0, 2):
            st = qm[i].weight.quant_state
            fm[i].weight.copy_(_ref_deq(qm[i].weight.data, st, torch.float32))
            if fm[i].bias is not None:
                fm[i].bias.copy_(qm[i].bias)
    inject_lora(fm, ["0", "2"], r=4, alpha=8, backend="torch")
    with torch.no_grad():
        for i in (0, 2):
            fm[i].lora_A.copy_(qm[i].lora_A)
            fm[i].lora_B.copy_(qm[i].lora_B)
    x = torch.randn(6, 53).to(DEVICE)
    y, yf = qm(x), fm(x)
    assert_close(y, yf.double(), torch.float32, "4-bit model", k=53)
    y.sum().backward()
    yf.sum().backward()
    for i in (0, 2):
        assert_close(qm[i].lora_A.grad, fm[i].lora_A.grad.double(), torch.float32, f"{i} dA", k=16)
        assert_close(qm[i].lora_B.grad, fm[i].lora_B.grad.double(), torch.float32, f"{i} dB", k=16)


def test_inject_lora_dora_on_a_4bit_model_refused_unchanged():
    qm = _model4()
    before = [(n, type(m)) for n, m in qm.named_modules()]
    with pytest.raises(NotImplementedError, match="QDoRA"):
        inject_lora(qm, ["0", "2"], r=4, use_dora=True)
    assert [(n, type(m)) for n, m in qm.named_modules()] == before


def test_save_load_adapter_round_trip_4bit(tmp_path):
    qm = _model4()
    inject_lora(qm, ["0", "2"], r=4, alpha=8, backend="torch")
    for layer in (qm[0], qm[2]):
        nn.init.normal_(layer.lora_B, std=0.2)
    fastpeft.save_adapter(qm, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys  # adapter weights only
    fresh = _model4()
    fastpeft.load_adapter(fresh, tmp_path, backend="torch")
    assert type(fresh[0]) is QLoRALinear
    x = torch.randn(4, 53).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), qm(x))


# ------------------------------------------------------------------------------------- patch_peft


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_peft_fuses_linear4bit(backend):
    g = torch.Generator().manual_seed(13)
    n, k, r = 33, 128, 4
    packed, st = _quantized(n, k, "nf4", 64, True)
    a, b = torch.randn(r, k, generator=g) * 0.2, torch.randn(n, r, generator=g) * 0.2
    bias = torch.randn(n, generator=g) * 0.1
    pm, layer = _peft_qlora(packed, st, bias.to(DEVICE), a.to(DEVICE), b.to(DEVICE), 8, torch.float32)
    x = torch.randn(2, 5, k, generator=g).to(DEVICE)
    xp = x.clone().requires_grad_()
    yp = pm(xp)
    yp.sum().backward()
    ref = (yp.detach(), xp.grad, layer.lora_A["default"].weight.grad.clone(),
           layer.lora_B["default"].weight.grad.clone())
    for p in pm.parameters():
        p.grad = None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        patch_peft(pm, backend=backend)
        xs = x.clone().requires_grad_()
        y = pm(xs)
        y.sum().backward()
    assert not _fastpeft_warnings(rec), _fastpeft_warnings(rec)
    assert is_patched(layer) and "Linear4bit" in repr(layer)
    assert isinstance(layer._fastpeft_cache.q, fastpeft.ops.qlora_linear.Quant4)  # the fused path ran
    got = (y, xs.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    for name, gt, rf, kk in zip(("y", "dx", "dA", "dB"), got, ref, (k, n, 16, 16)):
        assert_close(gt, rf.double(), torch.float32, f"patched {name}", k=kk)
    unpatch_peft(pm)
    assert not is_patched(layer) and type(layer).__name__ == "Linear4bit"


def test_patch_peft_leaves_qdora_on_peft_path():
    from peft import LoraConfig, get_peft_model

    packed, st = _quantized(16, 64, "nf4", 64, False)
    model = nn.Sequential()
    model.add_module("proj", _base4(packed, st))
    model.is_loaded_in_4bit = True
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["proj"], use_dora=True))
    nn.init.normal_(pm.base_model.model.proj.lora_B["default"].weight)
    x = torch.randn(3, 64).to(DEVICE)
    with torch.no_grad():
        ref = pm(x)
    with pytest.warns(UserWarning, match="QDoRA"):
        patch_peft(pm)
    with warnings.catch_warnings(record=True) as rec:  # named once, at patch time
        warnings.simplefilter("always")
        with torch.no_grad():
            y = pm(x)
    assert not _fastpeft_warnings(rec)
    assert "_fastpeft_cache" not in vars(pm.base_model.model.proj)  # PEFT's path ran
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_peft_loads_the_adapter_of_a_4bit_model(tmp_path):
    """fastpeft.save_adapter on a 4-bit model writes what PEFT loads onto the same 4-bit model, with the same output."""
    from peft import PeftModel

    qm = _model4()
    inject_lora(qm, ["0", "2"], r=4, alpha=8, backend="torch")
    for layer in (qm[0], qm[2]):
        nn.init.normal_(layer.lora_B, std=0.2)
    fastpeft.save_adapter(qm, tmp_path)
    base = _model4()
    base.is_loaded_in_4bit = True
    pm = PeftModel.from_pretrained(base, str(tmp_path))
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    assert isinstance(pm.base_model.model[0], PeftLinear4bit)
    x = torch.randn(4, 53).to(DEVICE)
    with torch.no_grad():
        y = qm(x)
    # x requiring grad: bitsandbytes 0.50's CPU inference repacking fails for an odd out·in
    yp = pm(x.clone().requires_grad_())
    assert_close(y, yp.detach().double(), torch.float32, "PEFT over fastpeft's file", k=53)
