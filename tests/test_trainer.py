"""Training a fastpeft model the ways people do: a plain loop, HF Trainer, torch.autocast, gradient checkpointing.

A tiny randomly initialised Llama learns a fixed batch (no downloads); losses must fall clearly.
"""

import pytest
import torch

from fastpeft import LoRALinear, count_parameters, inject_lora

from conftest import DEVICE

transformers = pytest.importorskip("transformers")

VOCAB = 61


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.3)  # a frozen lm_head at 0.02 keeps every logit near 0
    return transformers.LlamaForCausalLM(cfg).to(DEVICE)


def _lora_model(dropout=0.0, seed=0):
    return inject_lora(_tiny_llama(seed), target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=8, alpha=16,
                       dropout=dropout)


def _batch(n=8, length=12, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _train(model, steps, autocast_dtype=None, lr=1e-2):
    ids = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        with torch.autocast(DEVICE, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _assert_learns(losses, what):
    assert all(map(lambda v: v == v and abs(v) != float("inf"), losses)), f"{what}: non-finite loss {losses}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, f"{what}: loss did not fall enough: {first:.3f} -> {last:.3f} ({losses})"


def test_plain_loop_loss_decreases():
    model = _lora_model(dropout=0.05)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _assert_learns(_train(model, 12), "fp32 loop")
    # only the adapters moved
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else []))
def test_autocast_loop_loss_decreases(dtype):
    model = _lora_model(dropout=0.05)
    ids = _batch()
    with torch.autocast(DEVICE, dtype=dtype):
        logits = model(ids).logits
    assert logits.dtype == dtype  # the LoRA layers compute in the autocast dtype, like nn.Linear
    model.zero_grad(set_to_none=True)
    losses = _train(model, 12, autocast_dtype=dtype)
    _assert_learns(losses, f"autocast {dtype} loop")
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(m.lora_A.dtype == torch.float32 for m in lora)  # master weights stay fp32


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    """Recomputation draws the same dropout seeds (checkpoint restores the RNG state), so checkpointed
    gradients equal the plain ones."""
    ids = _batch()
    grads = []
    for checkpointing in (False, True):
        model = _lora_model(dropout=0.2)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.1)  # same values in both models (seeded in order)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model.train()
        torch.manual_seed(42)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    # and a checkpointed model trains
    model = _lora_model(dropout=0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_learns(_train(model, 12), "gradient checkpointing loop")


class _FixedBatches(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids.cpu()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _peft_patched_model():
    peft = pytest.importorskip("peft")
    from fastpeft.peft_compat import patch_peft

    pm = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    return patch_peft(pm)


@pytest.mark.parametrize("kind", ["fastpeft", "peft-patched"])
def test_hf_trainer_loss_decreases(tmp_path, kind):
    pytest.importorskip("accelerate")
    model = _lora_model(dropout=0.05) if kind == "fastpeft" else _peft_patched_model()
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
        use_cpu=DEVICE == "cpu", dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_FixedBatches(_batch()))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    _assert_learns(losses, f"Trainer ({kind})")
