"""DoRA (PEFT's use_dora=True): fastpeft.dora_linear, LoRALinear(use_dora=True), inject_lora(use_dora=True),
patch_peft's fused DoRA layers and PEFT's file format, against PEFT itself run in float64.

PEFT's definition (peft/tuners/lora/dora.py): y = x·W0ᵀ + b + (g − 1)⊙(xd·W0ᵀ) + g⊙s·(xd·Aᵀ)·Bᵀ with
g = m/‖W0 + s·B·A‖ per output row (detached) and xd = dropout(x). With dropout, PEFT's own layer runs with a
dropout module that applies fastpeft's mask (same seed, same bits), so the reference is PEFT's code path itself.
"""
import copy
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fastpeft
from alloc_recorder import AllocRecorder, SavedRecorder
from fastpeft import peft_compat
from fastpeft.dropout import dropout_keep_mask, new_seed
from fastpeft.errors import BackendUnavailableError
from fastpeft.ops import dora_linear_cached as dcached
from fastpeft.ops.dora_linear_torch import dora_norm
from tolerances import assert_close

from conftest import DEVICE

peft = pytest.importorskip("peft")

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    peft_compat._warned.clear()
    yield
    peft_compat._warned.clear()


class MaskDropout(nn.Module):
    """fastpeft's dropout stream as a module, so that PEFT's own DoRA forward runs with fastpeft's mask."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        keep = dropout_keep_mask(self.seed, rows, x.shape[-1], self.p).reshape(x.shape).to(x.device)
        return x * keep.to(x.dtype) / (1 - self.p)


def _peft_dora(in_f=37, out_f=29, r=5, alpha=7, p=0.0, bias=True, dtype=torch.float32, seed=0, **cfg):
    """A one-Linear PEFT DoRA model with B and the magnitude randomised (so every term counts)."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(lin=nn.Linear(in_f, out_f, bias=bias))).to(DEVICE, dtype)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=True,
                                                  lora_dropout=p, **cfg))
    layer = pm.base_model.model.lin
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        b = layer.lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=g).to(b) * 0.3)
        m = layer.lora_magnitude_vector["default"].weight
        m.mul_((torch.rand(m.shape, generator=g) + 0.5).to(m))
    return pm, layer


def _grads(layer):
    return {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}


def _run(model, x, dy):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    return y, x.grad


def _check_against(pm, ref64, x, dy, dtype, what, k=None):
    """Outputs and every gradient of the patched PEFT model `pm` against PEFT's own float64 copy."""
    y, gx = _run(pm, x, dy)
    ry, rgx = _run(ref64, x.double(), dy.double())
    assert y.dtype == x.dtype
    assert_close(y, ry, dtype, f"{what} y", k=k)
    assert_close(gx, rgx, dtype, f"{what} dx", k=k)
    g, rg = _grads(pm), _grads(ref64)
    assert g.keys() == rg.keys() and any("magnitude" in n for n in g)
    for n in g:
        assert g[n] is not None and g[n].dtype == dict(pm.named_parameters())[n].dtype, n
        assert_close(g[n], rg[n], dtype, f"{what} grad of {n}", k=k)


# ------------------------------------------------------------------------------------------ the norm


def test_norm_identity_matches_the_formed_matrix_in_float64():
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, r, s in ((29, 37, 5, 1.4), (1, 3, 1, -2.0), (64, 17, 16, 0.25)):
        w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        a = torch.randn(r, in_f, generator=g, dtype=torch.float64)
        b = torch.randn(out_f, r, generator=g, dtype=torch.float64)
        formed = torch.linalg.norm(w + s * (b @ a), dim=1)
        torch.testing.assert_close(dora_norm(w, a, b, s), formed, rtol=1e-12, atol=1e-12)
        # fp32, fp16 and bf16 inputs (fp32 accumulation) against the formed matrix of the same rounded inputs
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            w_, a_, b_ = (t.to(dt) for t in (w, a, b))
            exp = torch.linalg.norm(w_.double() + s * (b_.double() @ a_.double()), dim=1)
            got = dora_norm(w_, a_.float(), b_.float(), s)
            assert got.dtype == torch.float32
            assert_close(got, exp, torch.float32, f"norm from {dt} W0", k=in_f)


# ------------------------------------------------------------------------------------------ parity with PEFT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 29, 5, (3, 4)), (16, 48, 16, (1,)), (5, 3, 1, (2, 7))],
                         ids=["odd", "M=1", "tiny"])
def test_patched_peft_dora_matches_peft_fp32(backend, shape):
    in_f, out_f, r, lead = shape
    pm, layer = _peft_dora(in_f, out_f, r, alpha=2 * r + 1)
    ref = copy.deepcopy(pm).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused: no fallback warning
        fastpeft.patch_peft(pm, backend=backend)
    assert peft_compat.is_patched(layer)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, in_f, generator=g).to(DEVICE)
    dy = torch.randn(*lead, out_f, generator=g).to(DEVICE)
    _check_against(pm, ref, x, dy, torch.float32, f"{backend} {shape}")
    assert layer.__dict__["_fastpeft_dora_cache"].backend == backend  # really fastpeft's path


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_peft_with_the_same_mask(backend):
    p = 0.3
    pm, layer = _peft_dora(p=p)
    ref = copy.deepcopy(pm).double()
    fastpeft.patch_peft(pm, backend=backend)
    pm.train()
    ref.train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 37, generator=g).to(DEVICE)
    dy = torch.randn(2, 5, 29, generator=g).to(DEVICE)
    torch.manual_seed(123)
    seed = new_seed()  # the seed the layer draws for this call
    ref.base_model.model.lin.lora_dropout["default"] = MaskDropout(p, seed)
    torch.manual_seed(123)
    _check_against(pm, ref, x, dy, torch.float32, f"{backend} dropout")
    # the mask matters, and eval mode drops nothing
    with torch.no_grad():
        pm.eval()
        ref.eval()
        assert_close(pm(x), ref(x.double()), torch.float32, "eval")
        assert not torch.allclose(pm(x), layer.base_layer(x), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_matches_peft(dtype):
    backends = ["torch"] + (["triton"] if DEVICE == "cuda" else [])  # the interpreter's 16-bit dots are wrong
    for backend in backends:
        pm, layer = _peft_dora(48, 40, 8, dtype=dtype)
        ref = copy.deepcopy(pm).double()
        fastpeft.patch_peft(pm, backend=backend)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 11, 48, generator=g).to(DEVICE, dtype)
        dy = torch.randn(3, 11, 40, generator=g).to(DEVICE, dtype)
        _check_against(pm, ref, x, dy, dtype, f"{backend} {dtype}")


def test_functional_op_every_gradient_noncontiguous_x_and_inplace_output():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(23, 19, generator=g)
    x = torch.randn(19, 2, 7, generator=g).permute(1, 2, 0)  # [2, 7, 19], not contiguous
    a, b = torch.randn(4, 19, generator=g) * 0.3, torch.randn(23, 4, generator=g) * 0.3
    m, bias = torch.rand(23, generator=g) + 0.5, torch.randn(23, generator=g)
    dy = torch.randn(2, 7, 23, generator=g)
    leaves64 = [t.double().requires_grad_(True) for t in (x, w, a, b, m, bias)]
    x6, w6, a6, b6, m6, bias6 = leaves64
    gg = m6 / torch.linalg.norm(w6 + 1.5 * b6 @ a6, dim=1).detach()
    ref = torch.relu(gg * (x6 @ w6.t() + 1.5 * (x6 @ a6.t()) @ b6.t()) + bias6)
    ref.backward(dy.double())
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b, m, bias)]
        y = fastpeft.dora_linear(leaves[0], *leaves[1:5], 1.5, leaves[5], backend=backend)
        y.relu_()  # the output is a fresh tensor: in-place ops on it train
        y.backward(dy)
        assert_close(y, ref, torch.float32, f"{backend} y")
        for name, t, r64 in zip(("dx", "dW", "dA", "dB", "dm", "dbias"), leaves, leaves64):
            assert_close(t.grad, r64.grad, torch.float32, f"{backend} {name}")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's pointer path; on a GPU the parity tests cover it")
def test_triton_gemm_column_scale_variants(monkeypatch):
    """The column-scaled GEMM in all its forms, the kernel's own store of the unscaled tile (STORE_PRE, which a GPU
    compiles for its TMA path only) included, against float64."""
    from fastpeft.kernels import lora_linear as k

    g = torch.Generator().manual_seed(11)
    M, K, N, R = 37, 45, 29, 5
    x, w, s, b = (torch.randn(*sh, generator=g) for sh in ((M, K), (N, K), (M, R), (N, R)))
    bias, col, colk = torch.randn(N, generator=g), torch.rand(N, generator=g) + 0.5, torch.rand(K, generator=g)
    pre64 = x.double() @ w.double().t() + 0.7 * s.double() @ b.double().t()
    for paths in (k.STORE_PRE_PATHS, ("tma", "ptr")):
        monkeypatch.setattr(k, "STORE_PRE_PATHS", paths)
        y, pre = k.lora_gemm(x, w, s, b, bias, 0.7, None, col=col, store_pre=True)
        assert_close(pre, pre64, torch.float32, f"pre {paths}")
        assert_close(y, pre64 * col.double() + bias.double(), torch.float32, f"y {paths}")
    assert_close(k.lora_gemm(x, w, s, b, None, 0.7, None, col=col), pre64 * col.double(), torch.float32, "y, no pre")
    dy, ds, a = torch.randn(M, N, generator=g), torch.randn(M, R, generator=g), torch.randn(R, K, generator=g)
    dx = k.lora_gemm(dy, w.t(), ds, a.t(), None, 1.0, None, col=col, col_mode="prologue")
    assert_close(dx, (dy.double() * col.double()) @ w.double() + ds.double() @ a.double(), torch.float32, "prologue")
    with pytest.raises(ValueError, match="col: expected shape"):
        k.lora_gemm(dy, w.t(), ds, a.t(), None, 1.0, None, col=colk, col_mode="prologue")


def test_empty_batch_and_frozen_magnitude_saves_no_m_by_out_tensor():
    layer = fastpeft.LoRALinear(nn.Linear(16, 12), r=4, use_dora=True, backend="torch").to(DEVICE)
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 12) and layer.lora_magnitude_vector.grad.abs().sum() == 0
    x = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    layer.lora_magnitude_vector.requires_grad_(False)
    with SavedRecorder() as saved:
        y = layer(x)
    saved.assert_none_shaped_like((64, 12), allow=[x], what="frozen magnitude")  # V is saved only for dm
    layer.lora_magnitude_vector.requires_grad_(True)
    with SavedRecorder() as saved:
        y = layer(x)
    assert sum(t.shape == (64, 12) for t in saved.saved) == 1  # V, [M, out]: the magnitude's gradient


# ------------------------------------------------------------------------------------------ the module


def test_module_init_is_peft_init_and_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(37, 29).to(DEVICE)
    pm, layer = _peft_dora()
    layer.base_layer.load_state_dict(base.state_dict())
    fresh = peft.get_peft_model(nn.Sequential(OrderedDict(lin=copy.deepcopy(base))),
                                peft.LoraConfig(r=5, lora_alpha=7, target_modules=["lin"], use_dora=True))
    ours = fastpeft.LoRALinear(copy.deepcopy(base), r=5, alpha=7, use_dora=True)
    assert isinstance(ours, fastpeft.LoRALinear) and type(ours) is fastpeft.DoRALinear and ours.use_dora
    assert_close(ours.lora_magnitude_vector, fresh.base_model.model.lin.lora_magnitude_vector["default"].weight,
                 torch.float32, "initial magnitude")
    x = torch.randn(4, 37, device=DEVICE)
    assert_close(ours(x), base(x).double(), torch.float32, "starts as the base layer")
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert "use_dora=True" in repr(ours)
    assert type(fastpeft.LoRALinear(nn.Linear(3, 3))) is fastpeft.LoRALinear


def _copy_into(ours, layer):
    """fastpeft DoRALinear `ours` given the weights of PEFT layer `layer`."""
    with torch.no_grad():
        ours.base_layer.load_state_dict(layer.base_layer.state_dict())
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_peft(backend):
    pm, layer = _peft_dora()
    ref = copy.deepcopy(pm).double()
    ours = fastpeft.LoRALinear(nn.Linear(37, 29), r=5, alpha=7, use_dora=True, backend=backend).to(DEVICE)
    _copy_into(ours, layer)
    g = torch.Generator().manual_seed(7)
    x, dy = torch.randn(6, 37, generator=g).to(DEVICE), torch.randn(6, 29, generator=g).to(DEVICE)
    y, gx = _run(ours, x, dy)
    ry, rgx = _run(ref, x.double(), dy.double())
    assert_close(y, ry, torch.float32, "y")
    assert_close(gx, rgx, torch.float32, "dx")
    rl = ref.base_model.model.lin
    for ours_p, theirs in ((ours.lora_A, rl.lora_A["default"].weight), (ours.lora_B, rl.lora_B["default"].weight),
                           (ours.lora_magnitude_vector, rl.lora_magnitude_vector["default"].weight)):
        assert_close(ours_p.grad, theirs.grad, torch.float32, "grad")


@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                    (torch.float16, None)], ids=["fp32", "bf16+fp32", "fp16"])
def test_merge_unmerge_exact_and_without_an_out_by_in_temporary(dtypes):
    w_dtype, a_dtype = dtypes
    out_f, in_f = 48, 40
    torch.manual_seed(0)
    layer = fastpeft.LoRALinear(nn.Linear(in_f, out_f).to(DEVICE, w_dtype), r=4, alpha=8, use_dora=True,
                                backend="torch", adapter_dtype=a_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(out_f, device=DEVICE).to(layer.lora_A.dtype) + 0.5)
    x = torch.randn(5, in_f, device=DEVICE, dtype=w_dtype)
    with torch.no_grad():
        y = layer(x)
        w0 = layer.base_layer.weight.clone()
        # PEFT's merged weight, formed in float64 for the check
        w64, a64, b64 = w0.double(), layer.lora_A.double(), layer.lora_B.double()
        merged64 = (layer.lora_magnitude_vector.double() / torch.linalg.norm(w64 + 2 * b64 @ a64, dim=1))[:, None] \
            * (w64 + 2 * b64 @ a64)
        with AllocRecorder() as rec:
            layer.merge()
        rec.assert_below(out_f * in_f, "merge")
        assert layer.merged
        assert_close(layer.base_layer.weight, merged64, w_dtype, "merged W0", k=in_f)
        assert_close(layer(x), y.double(), w_dtype, "merged forward", k=in_f)
        with AllocRecorder() as rec:
            layer.unmerge()
        rec.assert_below(out_f * in_f, "unmerge")
        assert_close(layer.base_layer.weight, w0.double(), w_dtype, "unmerged W0", k=in_f)
        assert_close(layer(x), y.double(), w_dtype, "unmerged forward", k=in_f)
    # the merged state loads as merged, with the norm unmerge needs
    layer.merge()
    clone = fastpeft.LoRALinear(nn.Linear(in_f, out_f).to(DEVICE, w_dtype), r=4, alpha=8, use_dora=True,
                                backend="torch", adapter_dtype=a_dtype)
    clone.load_state_dict(layer.state_dict())
    assert clone.merged
    clone.unmerge()
    assert_close(clone.base_layer.weight, w0.double(), w_dtype, "unmerged after a state_dict round trip", k=in_f)


def test_forward_and_backward_form_no_out_by_in_temporary():
    out_f, in_f = 96, 80
    layer = fastpeft.LoRALinear(nn.Linear(in_f, out_f), r=8, use_dora=True, backend="torch").to(DEVICE)
    nn.init.normal_(layer.lora_B, std=0.2)
    x = torch.randn(16, in_f, device=DEVICE, requires_grad=True)
    layer(x)  # ‖w_i‖² cached
    with AllocRecorder() as rec:
        layer(x).sum().backward()
    rec.assert_below(out_f * in_f, "DoRA forward+backward")


def test_merge_refuses_a_zero_scale_and_leaves_w0():
    layer = fastpeft.LoRALinear(nn.Linear(8, 6), r=2, use_dora=True).to(DEVICE)
    with torch.no_grad():
        layer.lora_magnitude_vector[3] = 0.0
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="output row 3"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_weight_norms_are_cached_and_recomputed_when_w0_changes(monkeypatch):
    calls = []
    real = dcached.weight_sq_norm
    monkeypatch.setattr(dcached, "weight_sq_norm", lambda w: calls.append(1) or real(w))
    layer = fastpeft.LoRALinear(nn.Linear(24, 20), r=4, use_dora=True, backend="torch").to(DEVICE)
    nn.init.normal_(layer.lora_B, std=0.3)
    layer._dora_cache.clear()
    calls.clear()
    x = torch.randn(5, 24, device=DEVICE)

    def expected():
        w, a, b, m = (t.detach().double()
                      for t in (layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
        g = m / torch.linalg.norm(w + layer.scaling * b @ a, dim=1)
        return g * (x.double() @ w.t() + layer.scaling * (x.double() @ a.t()) @ b.t()) + layer.bias.double()

    for _ in range(3):
        y = layer(x)
    assert len(calls) == 1
    assert_close(y, expected(), torch.float32, "cached")
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)  # in place: the version counter moves
    assert_close(layer(x), expected(), torch.float32, "after an in-place change")
    assert len(calls) == 2
    layer.merge()
    layer.unmerge()
    assert_close(layer(x), expected(), torch.float32, "after merge/unmerge")
    layer.base_layer.weight.data = torch.randn(20, 24, device=DEVICE)  # replaced storage
    assert_close(layer(x), expected(), torch.float32, "after .data =")
    state = copy.deepcopy(layer.state_dict())
    state["base_layer.weight"] = torch.randn(20, 24)
    layer.load_state_dict(state)
    assert_close(layer(x), expected(), torch.float32, "after load_state_dict")
    n = len(calls)
    layer(x)
    assert len(calls) == n  # unchanged W0: cached again


def test_copies_pickles_and_autocast():
    layer = fastpeft.LoRALinear(nn.Linear(24, 20), r=4, use_dora=True, dropout=0.1, backend="torch").to(DEVICE)
    nn.init.normal_(layer.lora_B, std=0.3)
    layer.eval()
    x = torch.randn(3, 24, device=DEVICE)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is fastpeft.DoRALinear
        assert_close(clone(x), y.double(), torch.float32, "copy")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        yb = layer(x)
    assert yb.dtype == torch.bfloat16
    assert_close(yb, y.double(), torch.bfloat16, "autocast bf16")


# ------------------------------------------------------------------------------------------ models and files


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(up=nn.Linear(20, 33), act=nn.GELU(), down=nn.Linear(33, 20),
                                     head=nn.Linear(20, 7))).to(DEVICE)


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.3)
            if "lora_magnitude_vector" in n:
                p.mul_((torch.rand(p.shape, generator=g) + 0.5).to(p))


def test_inject_lora_use_dora_matches_peft_and_saves_in_peft_format(tmp_path):
    model = fastpeft.inject_lora(_mlp(), ["up", "down"], r=4, alpha=6, use_dora=True, backend="torch")
    assert all(type(model.get_submodule(n)) is fastpeft.DoRALinear for n in ("up", "down"))
    assert type(model.head) is nn.Linear and not model.head.weight.requires_grad
    _randomize(model)
    fastpeft.save_adapter(model, tmp_path / "ours")
    import json

    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    pm = peft.PeftModel.from_pretrained(_mlp(), str(tmp_path / "ours"), is_trainable=True)  # PEFT loads ours
    ref = copy.deepcopy(pm).double()
    x = torch.randn(6, 20, device=DEVICE)
    dy = torch.randn(6, 7, device=DEVICE)
    y, gx = _run(model, x, dy)
    ry, rgx = _run(ref, x.double(), dy.double())
    assert_close(y, ry, torch.float32, "y")
    assert_close(gx, rgx, torch.float32, "dx")
    for n in ("up", "down"):
        theirs = ref.base_model.model.get_submodule(n)
        ours = model.get_submodule(n)
        assert_close(ours.lora_magnitude_vector.grad, theirs.lora_magnitude_vector["default"].weight.grad,
                     torch.float32, f"{n} dm")
        assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, torch.float32, f"{n} dA")


def test_peft_saved_dora_adapter_loads_into_fastpeft(tmp_path):
    pm = peft.get_peft_model(_mlp(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["up", "head"],
                                                     use_dora=True))
    _randomize(pm, seed=5)
    pm.save_pretrained(str(tmp_path / "peft"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    assert "base_model.model.up.lora_magnitude_vector" in keys  # PEFT's file key
    model = fastpeft.load_adapter(_mlp(), tmp_path / "peft", backend="torch")
    assert type(model.up) is fastpeft.DoRALinear and model.up.use_dora
    x = torch.randn(4, 20, device=DEVICE)
    with torch.no_grad():
        assert_close(model(x), copy.deepcopy(pm).double()(x.double()), torch.float32, "loaded")
    # saved again by fastpeft: the same tensors under the same keys
    fastpeft.save_adapter(model, tmp_path / "again")
    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a DoRA file does not load into plain LoRA layers, nor a LoRA file into DoRA layers, naming why
    plain = fastpeft.inject_lora(_mlp(), ["up", "head"], r=3, alpha=5)
    with pytest.raises(ValueError, match="use_dora: the config has True but layer"):
        fastpeft.load_adapter(plain, tmp_path / "peft")
    bad = tmp_path / "bad"
    pm.save_pretrained(str(bad))
    sd = load_file(str(bad / "adapter_model.safetensors"))
    sd["base_model.model.up.lora_magnitude_vector"] = torch.ones(32)
    from safetensors.torch import save_file

    save_file(sd, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"lora_magnitude_vector is \[out_features\]"):
        fastpeft.load_adapter(_mlp(), bad)


def test_patch_peft_dora_second_adapter_and_backend_cuda_stay_exact():
    pm = peft.get_peft_model(_mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    pm.add_adapter("dora", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["up"], use_dora=True))
    _randomize(pm, seed=3)
    pm.base_model.set_adapter(["default", "dora"])  # DoRA after a LoRA adapter: PEFT's own DoRA on the sum
    ref = copy.deepcopy(pm).double()
    fastpeft.patch_peft(pm, backend="torch")
    x, dy = torch.randn(5, 20, device=DEVICE), torch.randn(5, 7, device=DEVICE)
    y, gx = _run(pm, x, dy)
    ry, rgx = _run(ref, x.double(), dy.double())
    assert_close(y, ry, torch.float32, "two adapters, DoRA second")
    assert_close(gx, rgx, torch.float32, "dx")
    for model in (pm, ref):
        model.base_model.set_adapter("dora")
    y, _ = _run(pm, x, dy)
    assert_close(y, _run(ref, x.double(), dy.double())[0], torch.float32, "DoRA alone")
    assert pm.base_model.model.up.__dict__["_fastpeft_dora_cache"].key is not None
    fastpeft.unpatch_peft(pm)
    with pytest.warns(UserWarning, match="DoRA with backend='cuda'"):
        fastpeft.patch_peft(pm, backend="cuda")


def test_torch_compile_fullgraph_traces_the_custom_op():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 19, generator=g).to(DEVICE)
    w = torch.randn(23, 19, generator=g).to(DEVICE)
    a = (torch.randn(4, 19, generator=g) * 0.3).to(DEVICE).requires_grad_()
    b = (torch.randn(23, 4, generator=g) * 0.3).to(DEVICE).requires_grad_()
    m = (torch.rand(23, generator=g) + 0.5).to(DEVICE).requires_grad_()
    x.requires_grad_()
    dy = torch.randn(3, 5, 23, generator=g).to(DEVICE)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, a, b, m):
        return fastpeft.dora_linear(x, w, a, b, m, 0.8, dropout_p=0.2, seed=77, backend="torch")

    y = f(x, w, a, b, m)
    y.backward(dy)
    grads = [t.grad.clone() for t in (x, a, b, m)]
    for t in (x, a, b, m):
        t.grad = None
    y_eager = fastpeft.dora_linear(x, w, a, b, m, 0.8, dropout_p=0.2, seed=77, backend="torch")
    y_eager.backward(dy)
    assert_close(y, y_eager.double(), torch.float32, "compiled y")
    for got, t in zip(grads, (x, a, b, m)):
        assert_close(got, t.grad.double(), torch.float32, "compiled grad")


def test_opcheck_of_the_custom_ops():
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(6, 11, generator=g), torch.randn(9, 11, generator=g)
    a, b = torch.randn(3, 11, generator=g).requires_grad_(), torch.randn(9, 3, generator=g).requires_grad_()
    m, bias = (torch.rand(9, generator=g) + 0.5).requires_grad_(), torch.randn(9, generator=g)
    op = torch.ops.fastpeft.dora_linear_fwd.default
    torch.library.opcheck(op, (x, w, a, b, m, bias, None, 0.7, 0.0, None, "torch", True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ------------------------------------------------------------------------------------------ errors


def test_bad_input_is_named():
    g = torch.Generator().manual_seed(10)
    x, w = torch.randn(4, 11, generator=g), torch.randn(9, 11, generator=g)
    a, b, m = torch.randn(3, 11, generator=g), torch.randn(9, 3, generator=g), torch.rand(9, generator=g)
    with pytest.raises(ValueError, match=r"magnitude: expected shape \[9\]"):
        fastpeft.dora_linear(x, w, a, b, m[:8], 1.0)
    with pytest.raises(ValueError, match="magnitude"):
        fastpeft.dora_linear(x, w, a, b, m[None], 1.0)
    with pytest.raises(TypeError, match="magnitude"):
        fastpeft.dora_linear(x, w, a, b, m.long(), 1.0)
    with pytest.raises(ValueError, match="weight_norm_sq"):
        fastpeft.dora_linear(x, w, a, b, m, 1.0, weight_norm_sq=torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="scaling"):
        fastpeft.dora_linear(x, w, a, b, m, float("nan"))
    with pytest.raises(ValueError, match="lora_b"):
        fastpeft.dora_linear(x, w, a, b[:, :2], m, 1.0)
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run"):
        fastpeft.dora_linear(x, w, a, b, m, 1.0, backend="cuda")
    with pytest.raises(TypeError, match="use_dora"):
        fastpeft.LoRALinear(nn.Linear(4, 4), use_dora="yes")
    with pytest.raises(ValueError, match="use_dora"):
        fastpeft.DoRALinear(nn.Linear(4, 4), use_dora=False)
    with pytest.raises(TypeError, match="use_dora"):
        fastpeft.inject_lora(_mlp(), ["up"], use_dora=1)
    y = fastpeft.dora_linear(x.requires_grad_(), w, a, b, m.requires_grad_(), 1.0)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
