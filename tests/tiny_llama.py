"""A tiny random-weight Llama (transformers' LlamaForCausalLM, no download), a fixed synthetic next-token task
and a training loop that records the loss of every step: the pieces tests/test_convergence.py compares.

The task: each sequence is an arithmetic progression modulo the vocabulary, x_i = (start + stride·i) mod V,
with start and stride drawn once from a seeded generator. A model that reads the first tokens can predict the
rest exactly, so a training run that works drives the loss far below log(V); one that does not stays near it.
"""
from __future__ import annotations

import torch

VOCAB = 64
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
SEQ = 24
BATCH = 8
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, layers: int = LAYERS):
    """A LlamaForCausalLM with random weights drawn after torch.manual_seed(seed), fp32, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=SEQ, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    # the default init (std 0.02) makes a near-constant random network at this width; a wider init gives
    # the frozen base features that a low-rank adapter can use
    cfg.initializer_range = 0.2
    model = LlamaForCausalLM(cfg).float()
    model.train()
    return model


def task_batch(seed: int = 1234) -> torch.Tensor:
    """The fixed training batch [BATCH, SEQ] of progressions mod VOCAB (the same tensor for every step)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    stride = torch.randint(1, 6, (BATCH, 1), generator=gen)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def train(model, make_opt, steps: int, batch: torch.Tensor, seed: int = 0) -> list[float]:
    """`steps` optimizer steps on `batch` (labels = inputs, HF shifts them); the loss before each step.
    torch.manual_seed(seed) first, so dropout draws (PEFT's masks, fastpeft's Philox seeds) repeat."""
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses
