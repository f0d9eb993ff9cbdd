"""The whole-model benchmark's presets, model, data and training variants (used by fastpeft.bench.model).

Every variant starts from one state dict of a randomly initialised transformers Llama (no download) and builds
(module to call, optimizer) from it:

    full_ft            full fine-tuning, torch.optim.AdamW on every parameter (the floor users compare LoRA with)
    peft               HF PEFT LoRA (r=16 on q,k,v,o,gate,up,down), eager
    peft_compiled      the same under torch.compile
    fastpeft           the PEFT model patched by fastpeft.patch_peft
    fastpeft_compiled  the same under torch.compile
    galore_torch       full-rank GaLore training with galore-torch's AdamW on the seven linear kinds
    fastpeft_galore    fastpeft's gradient-free GaLore (fastpeft.galore.enable + fastpeft.optim.GaLoreAdamW)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {
    # tiny: the whole preset (7 variants, aot_eager compile) in about a minute on 2 CPU cores
    "cpu": dict(layers=2, hidden=128, intermediate=344, heads=4, kv_heads=2, vocab=1024, seq=64, batch=2,
                steps=30, warmup=2, dtype="fp32", galore_rank=16, compile_backend="aot_eager", threads=1),
    # two decoder layers at Llama-3-8B widths; vocab 32000 (not 128256) so the frozen LM head does not swamp
    # the two layers whose training the variants differ in
    "gpu": dict(layers=2, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000, seq=2048, batch=4,
                steps=5, warmup=2, dtype="bf16", galore_rank=128, compile_backend="inductor", threads=None),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_R, LORA_ALPHA, LR, GALORE_SCALE, GALORE_GAP = 16, 32, 1e-4, 0.25, 200
DESCRIPTIONS = {
    "full_ft": "full fine-tuning, torch.optim.AdamW on every parameter",
    "peft": "HF PEFT LoRA r=16 on all linear layers, eager",
    "peft_compiled": "HF PEFT LoRA under torch.compile",
    "fastpeft": "HF PEFT LoRA patched by fastpeft.patch_peft",
    "fastpeft_compiled": "fastpeft.patch_peft under torch.compile",
    "galore_torch": "full-rank GaLore, galore-torch's AdamW (forms each full weight gradient)",
    "fastpeft_galore": "full-rank GaLore, fastpeft gradient-free mode (fastpeft.galore.enable + GaLoreAdamW)",
}
VARIANTS = tuple(DESCRIPTIONS)


def llama_config(cfg: dict):
    from transformers import LlamaConfig

    if cfg["hidden"] % cfg["heads"] or cfg["heads"] % cfg["kv_heads"]:
        raise ValueError(f"hidden ({cfg['hidden']}) must divide by heads ({cfg['heads']}) and heads by kv_heads "
                         f"({cfg['kv_heads']})")
    return LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["kv_heads"], max_position_embeddings=max(cfg["seq"], 128),
                       tie_word_embeddings=False, attention_dropout=0.0)


def reference_state(cfg: dict, seed: int) -> dict:
    """The one set of initial weights every variant loads (fp32, on the CPU)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_model(cfg: dict, state: dict, device, dtype):
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(llama_config(cfg))  # rotary buffers are not in the state dict: built here
    model.load_state_dict(state)
    return model.to(dtype)


def batches(cfg: dict, n: int, seed: int, device) -> list[torch.Tensor]:
    """n batches of random token ids, the same for every variant."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen).to(device) for _ in range(n)]


def base_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """float64 sums of the base weights under their plain Llama names (PEFT's prefixes and LoRA tensors
    dropped), sorted by name: equal for variants that start from the same weights."""
    sums = {}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer.", ".")
        sums[name] = t.detach().double().sum().cpu()
    return torch.stack([sums[k] for k in sorted(sums)])


@dataclasses.dataclass
class Built:
    model: torch.nn.Module  # what the fingerprint is taken of
    call: Callable  # call(input_ids) -> loss
    optimizer: torch.optim.Optimizer
    compiled: str | None  # the torch.compile backend, or None


def _lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 2)  # the same LoRA A matrices in every LoRA variant
    return get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=list(LAYERS)))


def _galore_groups(model, rank: int):
    galore = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LAYERS]
    ids = {id(p) for p in galore}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": galore, "rank": rank, "update_proj_gap": GALORE_GAP, "scale": GALORE_SCALE,
                               "proj_type": "std"}]


def build(name: str, model: torch.nn.Module, opts: dict) -> Built:
    """The variant `name` around a fresh model. opts: seed, galore_rank, compile_backend (None: no compile)."""
    import fastpeft

    lr, compiled = opts.get("lr", LR), None
    if name == "full_ft":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    elif name in ("peft", "peft_compiled", "fastpeft", "fastpeft_compiled"):
        model = _lora(model, opts["seed"])
        if name.startswith("fastpeft"):
            fastpeft.patch_peft(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        if name.endswith("_compiled"):
            compiled = opts.get("compile_backend")
            if compiled is None:
                raise ValueError(f"{name}: needs a compile backend (the run has --no-compile)")
    elif name == "galore_torch":
        from .galore import load_galore_torch

        cls = load_galore_torch()
        if cls is None:
            raise ImportError("galore_torch: galore-torch is not installed (pip install galore-torch)")
        opt = cls(_galore_groups(model, opts["galore_rank"]), lr=lr, eps=1e-6, weight_decay=0.0)
    elif name == "fastpeft_galore":
        import fastpeft.galore as fg
        from fastpeft.optim import GaLoreAdamW

        fg.enable(model, list(LAYERS), rank=opts["galore_rank"], update_proj_gap=GALORE_GAP, scale=GALORE_SCALE)
        opt = GaLoreAdamW(model.parameters(), lr=lr, eps=1e-6, weight_decay=0.0)
    else:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {name!r}")
    fn = torch.compile(model, backend=compiled) if compiled else model
    return Built(model, lambda ids: fn(input_ids=ids, labels=ids).loss, opt, compiled)


__all__ = ["LAYERS", "PRESETS", "DTYPES", "DESCRIPTIONS", "VARIANTS", "Built", "llama_config", "reference_state",
           "fresh_model", "batches", "base_fingerprint", "build"]
