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
