"""inject_lora on a small randomly initialised transformers model (no downloads)."""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import LoRALinear, count_parameters, inject_lora

from conftest import DEVICE

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_lora_parameters_train_and_output_is_unchanged(backend):
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    with torch.no_grad():
        before = model(ids).logits
    _, total_before = count_parameters(model)
    r = 4
    model = inject_lora(model, target_modules=["q_proj", "v_proj"], r=r, alpha=8, dropout=0.1, backend=backend)
    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora_layers) == 4  # q_proj and v_proj in each of two layers
    # closed form: r·(in + out) per targeted layer; q: 48->48, v: 48->24 (2 kv heads of 12)
    expected = 2 * (r * (48 + 48) + r * (48 + 24))
    trainable, total = count_parameters(model)
    assert trainable == expected and total == total_before + expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    with torch.no_grad():
        after = model(ids).logits  # eval mode, B = 0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in lora_layers)


def test_matching_rules_follow_peft():
    model = _tiny_llama()
    inject_lora(model, target_modules=r".*\.0\.self_attn\.(q|k)_proj", r=2)  # a string is a full-match regex
    names = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert names == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(model, target_modules=["q_proj"], r=2)


def test_bad_targets():
    with pytest.raises(ValueError, match="matches no module"):
        inject_lora(_tiny_llama(), target_modules=["nonexistent_proj"])
    with pytest.raises(TypeError, match="only nn.Linear can take LoRA"):
        inject_lora(_tiny_llama(), target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="target_modules: expected"):
        inject_lora(_tiny_llama(), target_modules=[])
    # a failed call leaves the model untouched
    model = _tiny_llama()
    with pytest.raises(TypeError):
        inject_lora(model, target_modules=["q_proj", "embed_tokens"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def _state(model):
    """What an injection may change: the module tree and every parameter's trainability."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def test_second_call_keeps_the_first_calls_adapters_trainable():
    model = _tiny_llama().train()
    inject_lora(model, target_modules=["q_proj"], r=2)
    q = model.model.layers[0].self_attn.q_proj
    q.lora_B.requires_grad_(False)  # a user's choice is kept as well
    inject_lora(model, target_modules=["v_proj"], r=3)
    v = model.model.layers[0].self_attn.v_proj
    assert isinstance(q, LoRALinear) and isinstance(v, LoRALinear)
    assert q.lora_A.requires_grad and not q.lora_B.requires_grad and v.lora_A.requires_grad and v.lora_B.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters()
        if n.endswith(("lora_A", "lora_B")) and n != "model.layers.0.self_attn.q_proj.lora_B"}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    ids = torch.randint(0, 97, (2, 5), device=DEVICE)
    model(ids, labels=ids).loss.backward()
    assert q.lora_A.grad is not None and q.lora_A.grad.abs().sum() > 0


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.attn(x, x, x)[0])


def test_bypassed_targets_are_refused_and_model_unchanged():
    model = _Attn()
    before = _state(model)
    with pytest.raises(ValueError, match=r"'attn\.out_proj'.*nn\.MultiheadAttention.*reads its weight directly.*"
                                         r"no effect"):
        inject_lora(model, target_modules=["proj", "out_proj"], r=2)
    assert _state(model) == before
    inject_lora(model, target_modules=["proj"], r=2)  # the valid part alone works


@pytest.mark.parametrize("second", [["base_layer"], r".*q_proj\.base_layer"])
def test_nested_adapters_are_refused_and_model_unchanged(second):
    model = _tiny_llama()
    inject_lora(model, target_modules=["q_proj"], r=2)
    before = _state(model)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.base_layer'.* inside "
                                         r"'model\.layers\.0\.self_attn\.q_proj'.*LoRALinear.*never change the output"):
        inject_lora(model, target_modules=second, r=2)
    assert _state(model) == before


def test_linear_subclass_with_own_forward_or_hooks_is_refused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 8))
    before = _state(model)
    with pytest.raises(TypeError, match=r"'1' is a Scaled.*own forward"):
        inject_lora(model, target_modules=["0", "1"], r=2)
    assert _state(model) == before
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match=r"'0' has forward or backward hooks"):
        inject_lora(model, target_modules=["0"], r=2)


def test_shared_module_is_refused():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match=r"'0' is the same module as '2'"):
        inject_lora(model, target_modules=["0"], r=2)


@pytest.mark.parametrize("bad", [dict(r=0), dict(dropout=1.0), dict(alpha=float("inf"))])
def test_bad_arguments_leave_model_unchanged(bad):
    model = _tiny_llama()
    before = _state(model)
    with pytest.raises((TypeError, ValueError)):
        inject_lora(model, target_modules=["q_proj", "v_proj"], **bad)
    assert _state(model) == before


def _copies(model, fresh):
    """`model` copied every way a user copies a model; `fresh()` builds an equal architecture for state_dict."""
    import copy
    import io
    import pickle

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    other = fresh()
    other.load_state_dict(model.state_dict())
    return {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
            "torch.save": torch.load(buf, weights_only=False), "state_dict": other}


def _train(model, steps=2):
    """Losses and adapter gradients of a few AdamW steps, dropout drawn from the global generator."""
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    record = []
    model.train()
    for step in range(steps):
        torch.manual_seed(50 + step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        record.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return record


def test_injected_model_copies_train_identically():
    def build():
        model = inject_lora(_tiny_llama(), target_modules=["q_proj", "v_proj"], r=3, alpha=5, dropout=0.1,
                            backend="torch")
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.normal_()
        return model

    model = build()
    copies = _copies(model, build)
    expected = _train(model)
    for how, clone in copies.items():
        assert sum(isinstance(m, LoRALinear) for m in clone.modules()) == 4, how
        got = _train(clone)
        for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, expected)):
            assert torch.equal(loss, ref_loss), f"{how}: step {step}: loss {loss} != {ref_loss}"
            assert grads.keys() == ref_grads.keys() and len(grads) == 8, how
            for n, g in grads.items():
                assert torch.equal(g, ref_grads[n]), f"{how}: step {step}: grad of {n}"
