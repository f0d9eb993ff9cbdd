"""fastpeft.patch_peft: a PEFT model's LoRA layers run through fastpeft with PEFT's outputs and gradients.

The reference is the same PEFT model, unpatched, in float64. Small randomly initialised transformers models.
"""
import copy
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fastpeft import peft_compat
from fastpeft.dropout import new_seed
from fastpeft.peft_compat import is_patched, patch_peft, unpatch_peft
from reference_lora import reference_with_grads
from tolerances import assert_close

from conftest import DEVICE

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 97


@pytest.fixture(autouse=True)
def _fresh_warnings():
    peft_compat._warned.clear()
    yield
    peft_compat._warned.clear()


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE)


def _tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=40, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # deterministic
    return transformers.BertForSequenceClassification(cfg).to(DEVICE)


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:  # B non-zero so that the adapter term is tested
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


def _ids(seed=3, shape=(2, 9)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _peft(base, **cfg):
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    pm = peft.get_peft_model(base, peft.LoraConfig(**cfg))
    _randomize_lora(pm)
    return pm


def _loss_and_grads(model, ids, labels=True, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kw) if labels else model(ids, **kw)
    loss = out.loss if labels else out.logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits, grads


# A whole model's loss gradient chains its products forward and back, and their rounding errors add: its K
# is the sum of their accumulation lengths along the path (about 1300 for these tiny models), rounded up for
# the softmax, norms and activations between them (see fastpeft/bench/tolerances.py).
MODEL_K = 4096


def _compare(patched, reference64, ids, dtype=torch.float32, what="", zero_grads=(), **kw):
    """zero_grads: name endings of parameters whose exact gradient is 0 (only rounding noise to compare)."""
    logits, grads = _loss_and_grads(patched, ids, **kw)
    ref_logits, ref_grads = _loss_and_grads(reference64, ids, **kw)
    assert_close(logits, ref_logits, dtype, f"{what} logits", k=MODEL_K)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert g is not None and ref_grads[n] is not None, n
        if n.endswith(zero_grads):
            assert g.abs().max() < 1e-5, n
        else:
            assert_close(g, ref_grads[n], dtype, f"{what} grad of {n}", k=MODEL_K)
    return grads


def _n_patched(model):
    return sum(is_patched(m) for m in model.modules())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_gradients_match_peft(backend, use_rslora):
    pm = _peft(_tiny_llama(), use_rslora=use_rslora)
    ref = copy.deepcopy(pm).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is left on PEFT's path
        patch_peft(pm, backend=backend)
    assert _n_patched(pm) == 6
    assert pm.state_dict().keys() == ref.state_dict().keys()
    grads = _compare(pm, ref, _ids(), what=f"{backend} rslora={use_rslora}")
    assert any("lora_A" in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())


def test_trainable_bias_matches_peft():
    # bias="all": every bias trains, the targeted layers' through fastpeft's dbias; BERT's q/v have biases
    pm = _peft(_tiny_bert(), target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")
    ref = copy.deepcopy(pm).double()
    patch_peft(pm, backend="torch")
    assert _n_patched(pm) == 4
    ids = _ids(shape=(3, 7))
    # attention's key bias shifts every score of a row equally: softmax cancels it, its gradient is 0
    grads = _compare(pm, ref, ids, labels=False, what="bias=all", zero_grads=("key.bias",))
    assert any(n.endswith("query.base_layer.bias") for n in grads)


def _single_layer_peft(p, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(lin=nn.Linear(29, 37))).to(DEVICE)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=5, lora_alpha=7, target_modules=["lin"], lora_dropout=p))
    _randomize_lora(pm)
    return pm


def test_dropout_uses_peft_p_and_fastpeft_mask():
    p = 0.3
    pm = _single_layer_peft(p)
    layer = pm.base_model.model.lin
    patch_peft(pm, backend="torch")
    pm.train()
    x = torch.randn(4, 3, 29, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 3, 37, device=DEVICE)
    torch.manual_seed(123)
    seed = new_seed()  # the seed fastpeft.lora_linear draws for this call
    torch.manual_seed(123)
    y = pm(x)
    y.backward(dy)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    ref_y, (gx, _, ga, gb, _) = reference_with_grads(x, base.weight, a, b, base.bias, layer.scaling["default"], dy,
                                                     p=p, seed=seed)
    assert_close(y, ref_y, torch.float32, "y with dropout")
    assert_close(x.grad, gx, torch.float32, "dx with dropout")
    assert_close(a.grad, ga, torch.float32, "dA with dropout")
    assert_close(b.grad, gb, torch.float32, "dB with dropout")
    # the mask is really applied: without dropout the output differs
    pm.eval()
    with torch.no_grad():
        y_eval = pm(x)
    ref_eval, _ = reference_with_grads(x, base.weight, a, b, base.bias, layer.scaling["default"], dy)
    assert_close(y_eval, ref_eval, torch.float32, "y in eval mode (no dropout)")
    assert not torch.allclose(y_eval, y.detach(), atol=1e-3)


def test_several_adapters_active_summed_like_peft():
    pm = _peft(_tiny_llama())
    pm.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"], use_rslora=True))
    _randomize_lora(pm, seed=7)
    pm.base_model.set_adapter(["default", "second"])
    ref = copy.deepcopy(pm).double()
    patch_peft(pm, backend="torch")
    grads = _compare(pm, ref, _ids(), what="two active adapters")
    assert any(".second." in n for n in grads) and any(".default." in n for n in grads)
    for model in (pm, ref):
        model.set_adapter("second")
    _compare(pm, ref, _ids(), what="second adapter only")


def test_disabled_and_merged_adapters_follow_peft():
    pm = _peft(_tiny_llama())
    ref = copy.deepcopy(pm).double()
    patch_peft(pm, backend="torch")
    ids = _ids()
    with torch.no_grad():
        with pm.disable_adapter(), ref.disable_adapter():
            base_out = ref(ids).logits
            assert_close(pm(ids).logits, base_out, torch.float32, "disabled adapters")
        assert not torch.allclose(ref(ids).logits, base_out, atol=1e-3)  # the adapter matters
        lora_out = pm(ids).logits
        assert_close(lora_out, ref(ids).logits, torch.float32, "enabled again")
        pm.merge_adapter()
        assert_close(pm(ids).logits, ref(ids).logits, torch.float32, "merged")
        pm.unmerge_adapter()
        assert_close(pm(ids).logits, ref(ids).logits, torch.float32, "unmerged")


def _patch_warnings(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in rec if "fastpeft" in str(w.message)]


def test_unfusable_configurations_stay_on_peft_path_with_one_warning():
    pm = _peft(_tiny_llama(), target_modules=["q_proj", "v_proj", "embed_tokens"])
    pm.add_adapter("dora", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    _randomize_lora(pm, seed=9)
    ref = copy.deepcopy(pm).double()
    msgs = _patch_warnings(lambda: patch_peft(pm, backend="torch"))
    assert len(msgs) == 1, msgs
    assert "Embedding" in msgs[0] and "model.embed_tokens" in msgs[0]
    assert "DoRA" not in msgs[0]  # DoRA layers are fused (fastpeft.dora_linear)
    assert _n_patched(pm) == 4  # the q/v Linear layers; the embedding stays PEFT's
    msgs = _patch_warnings(lambda: _compare(pm, ref, _ids(), what="LoRA with an Embedding target"))
    assert msgs == []
    for model in (pm, ref):
        model.set_adapter("dora")
    msgs = _patch_warnings(lambda: _compare(pm, ref, _ids(), what="DoRA, fused"))
    assert msgs == []


def test_mixed_batch_adapter_names_warns_and_matches_peft():
    pm = _peft(_tiny_llama())
    ref = copy.deepcopy(pm).double()
    patch_peft(pm, backend="torch")
    pm.eval()
    ref.eval()
    ids = _ids()
    names = ["default", "__base__"]
    with torch.no_grad():
        msgs = _patch_warnings(lambda: assert_close(pm(ids, adapter_names=names).logits,
                                                    ref(ids, adapter_names=names).logits, torch.float32, "mixed"))
    assert len(msgs) == 1 and "adapter_names" in msgs[0]


def test_save_pretrained_and_load_adapter_keep_working(tmp_path):
    pm = _peft(_tiny_llama())
    ref = copy.deepcopy(pm)
    patch_peft(pm, backend="torch")
    pm.save_pretrained(tmp_path / "patched")
    ref.save_pretrained(tmp_path / "ref")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "patched" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a second adapter loaded into the patched model runs fused and matches PEFT
    other = _peft(_tiny_llama(), r=3, lora_alpha=6)
    _randomize_lora(other, seed=21)
    other.save_pretrained(tmp_path / "other")
    for model in (pm, ref):
        model.load_adapter(str(tmp_path / "other"), adapter_name="other")
        model.set_adapter("other")
    ref64 = copy.deepcopy(ref).double()
    assert _n_patched(pm) == 6
    ids = _ids()
    with torch.no_grad():
        assert_close(pm(ids).logits, ref64(ids).logits, torch.float32, "loaded adapter")
    # a patched model loads from disk and pickles like PEFT's
    re_pm = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "patched"))
    patch_peft(re_pm)
    ref64.set_adapter("default")
    with torch.no_grad():
        assert_close(re_pm(ids).logits, ref64(ids).logits, torch.float32, "reloaded")
    clone = pickle.loads(pickle.dumps(re_pm))
    assert _n_patched(clone) == 6 and _n_patched(copy.deepcopy(re_pm)) == 6


def test_unpatch_restores_peft_forward():
    pm = _peft(_tiny_llama())
    ref = copy.deepcopy(pm).double()
    layer_cls = type(pm.base_model.model.model.layers[0].self_attn.q_proj)
    patch_peft(pm)
    assert _n_patched(pm) == 6
    unpatch_peft(pm)
    assert _n_patched(pm) == 0
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj) is layer_cls
    assert not any(hasattr(m, "_fastpeft_backend") for m in pm.modules())
    _compare(pm, ref, _ids(), what="unpatched")


def _rel_err(a, ref):
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / ref.norm()).item()


def _as_accurate_as_peft(patched, peft_model, peft64, ids, autocast=False):
    """Both run a whole network in bf16, each rounding differently: fastpeft must be as close to the float64
    result as PEFT's own run is (the per-op tolerance table does not bound a 2-layer model)."""
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        logits, grads = _loss_and_grads(patched, ids)
        peft_logits, peft_grads = _loss_and_grads(peft_model, ids)
    exp_logits, exp_grads = _loss_and_grads(peft64, ids)
    assert logits.dtype == peft_logits.dtype == torch.bfloat16
    pairs = [("logits", logits, peft_logits, exp_logits)]
    pairs += [(n, g, peft_grads[n], exp_grads[n]) for n, g in grads.items()]
    for n, ours, theirs, exp in pairs:
        assert ours.dtype == theirs.dtype, n
        ours_err, peft_err = _rel_err(ours, exp), _rel_err(theirs, exp)
        assert ours_err <= 2 * peft_err + 1e-3 and ours_err < 0.05, f"{n}: {ours_err=} {peft_err=}"
    return grads


def test_autocast_bf16_matches_peft():
    pm = _peft(_tiny_llama())
    ref, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    patch_peft(pm, backend="torch")
    grads = _as_accurate_as_peft(pm, ref, ref64, _ids(), autocast=True)
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_bf16_base_with_fp32_adapters_matches_peft():
    pm = _peft(_tiny_llama().to(torch.bfloat16))  # PEFT keeps the adapters in fp32 (autocast_adapter_dtype)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ref, ref64 = copy.deepcopy(pm), copy.deepcopy(pm).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused, not left on PEFT's path
        patch_peft(pm, backend="torch")
        grads = _as_accurate_as_peft(pm, ref, ref64, _ids())
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        patch_peft(42)
    with pytest.raises(ValueError, match="found no peft LoraLayer"):
        patch_peft(_tiny_llama())
    pm = _peft(_tiny_llama())
    with pytest.raises(ValueError, match="backend: expected one of"):
        patch_peft(pm, backend="bogus")
    assert _n_patched(pm) == 0


def test_repr_keeps_peft_class_names():
    pm = _peft(_tiny_llama())
    expected = repr(pm)
    assert "lora.Linear(" in expected
    patch_peft(pm, backend="torch")
    assert _n_patched(pm) == 6
    assert repr(pm) == expected  # a patched model prints exactly as PEFT's does


class _InPlaceAfterLoRA(nn.Module):
    """Model code that edits a LoRA layer's output in place, as AdaLoRA (`result += ...`) and nn.ReLU(inplace=True) do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(29, 37)
        self.skip = nn.Linear(29, 37)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(37, 11)

    def forward(self, x):
        h = self.lin(x)
        h += self.skip(x)
        h = self.act(h)
        y = self.out(x.new_zeros(()) + h)  # read h after the in-place edits
        y *= 2
        return y


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_can_be_modified_in_place(backend):
    torch.manual_seed(0)
    pm = peft.get_peft_model(_InPlaceAfterLoRA().to(DEVICE),
                             peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lin", "out"], lora_dropout=0.0))
    _randomize_lora(pm)
    ref = copy.deepcopy(pm).double()
    patch_peft(pm, backend=backend)
    assert _n_patched(pm) == 2
    pm.train()
    ref.train()
    x = torch.randn(2, 5, 29, device=DEVICE)
    dy = torch.randn(2, 5, 11, device=DEVICE)
    outs = {}
    for name, model in (("patched", pm), ("ref", ref)):
        xi = x.detach().to(next(model.parameters()).dtype).requires_grad_(True)
        y = model(xi)
        y.backward(dy.to(y.dtype))
        outs[name] = (y, xi.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (y, gx, grads), (ry, rgx, rgrads) = outs["patched"], outs["ref"]
    assert_close(y, ry, torch.float32, "y")
    assert_close(gx, rgx, torch.float32, "dx")
    assert grads.keys() == rgrads.keys() and len(grads) == 4
    for n, g in grads.items():
        assert_close(g, rgrads[n], torch.float32, f"grad of {n}")


def test_patched_model_copies_train_identically():
    import io

    def build():
        pm = _peft(_tiny_llama(), lora_dropout=0.1)
        patch_peft(pm, backend="torch")
        return pm

    pm = build()
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    other = build()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # so that only load_state_dict can make it equal
    other.load_state_dict(pm.state_dict())
    copies = {"deepcopy": copy.deepcopy(pm), "pickle": pickle.loads(pickle.dumps(pm)),
              "torch.save": torch.load(buf, weights_only=False), "state_dict": other}
    ids = _ids()

    def train(model, steps=2):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        record = []
        model.train()
        for step in range(steps):
            torch.manual_seed(70 + step)
            logits, grads = _loss_and_grads(model, ids)
            record.append((logits.detach(), {n: g.clone() for n, g in grads.items()}))
            opt.step()
        return record

    expected = train(pm)
    for how, clone in copies.items():
        assert _n_patched(clone) == 6 and repr(clone) == repr(pm), how
        for step, ((logits, grads), (ref_logits, ref_grads)) in enumerate(zip(train(clone), expected)):
            assert torch.equal(logits, ref_logits), f"{how}: step {step}: logits"
            assert grads.keys() == ref_grads.keys(), how
            for n, g in grads.items():
                assert torch.equal(g, ref_grads[n]), f"{how}: step {step}: grad of {n}"
