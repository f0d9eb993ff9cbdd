"""GaLore end to end: a small randomly initialised transformers Llama trained on a learnable synthetic
language, AdamW against gradient-free GaLore (the paper reports GaLore within a few percent of AdamW's
loss). A training-quality figure next to the timings of fastpeft.bench.galore; run by
benchmarks/bench_galore.py."""
from __future__ import annotations

import torch

LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def losses(steps: int, device, small: bool) -> dict:
    """First loss and the mean of the last 10 per optimizer, and their ratio (GaLore / AdamW)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastpeft.galore as fg
    from fastpeft.optim import GaLoreAdamW

    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=128) if small else \
        dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512)
    seq, batch = (32, 8) if small else (256, 16)
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(0, cfg["vocab_size"], (cfg["vocab_size"], 4), generator=gen)  # a random bigram language

    def batch_fn():
        toks = torch.empty(batch, seq, dtype=torch.long)
        toks[:, 0] = torch.randint(0, cfg["vocab_size"], (batch,), generator=gen)
        for t in range(1, seq):
            toks[:, t] = table[toks[:, t - 1], torch.randint(0, 4, (batch,), generator=gen)]
        return toks.to(device)

    data = [batch_fn() for _ in range(steps)]
    out = {}
    for mode in ("adamw", "galore_gradient_free"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(device)
        if mode == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
        else:
            fg.enable(model, LAYERS, rank=16 if small else 128, update_proj_gap=50, scale=0.25)
            opt = GaLoreAdamW(model.parameters(), lr=4e-3)  # the paper's recipe: scale 0.25 with a larger lr
        hist = []
        for toks in data:
            loss = model(input_ids=toks, labels=toks).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            hist.append(loss.item())
        out[mode] = {"first_loss": hist[0], "final_loss_avg10": sum(hist[-10:]) / len(hist[-10:])}
    out["final_ratio"] = out["galore_gradient_free"]["final_loss_avg10"] / out["adamw"]["final_loss_avg10"]
    return out


__all__ = ["losses"]
