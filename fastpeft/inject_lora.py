"""Put LoRA into a model that is already built, the way HF PEFT chooses target modules (fastpeft.targets)."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from .modules.lora import LoRALinear
from .targets import (  # noqa: F401  (matches_target, set_submodule: importable from here, as before)
    REPLACE, freeze_all_but_adapters, is_linear4bit, matches_target, module_aliases, refusal, select_targets,
    set_submodule,
)


def find_target_linears(model: nn.Module, target_modules: str | Iterable[str], exclude_modules=None) -> list[str]:
    """Names of the modules `target_modules` selects; raises, before anything changes, unless there is at least
    one and each is a plain nn.Linear (or a bitsandbytes Linear4bit: QLoRA), without an adapter yet, that the
    model really calls where it stands."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    chosen = select_targets(model, target_modules, exclude_modules)
    aliases = module_aliases(model)
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            raise ValueError(f"target_modules: module {name!r} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target_modules: module {name!r} is a {type(module).__name__}; only nn.Linear can take LoRA")
        if type(module).forward is not nn.Linear.forward and not is_linear4bit(module):
            raise TypeError(f"target_modules: module {name!r} is a {type(module).__name__} with its own forward; "
                            "the LoRA layer computes x·Wᵀ + b itself and would bypass it")
        why = refusal(model, name, module, aliases, how=REPLACE, noun="LoRA")
        if why is not None:
            raise ValueError(f"target_modules: {why}")
    return [name for name, _ in chosen]


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], r: int = 8, alpha: float = 16,
                dropout: float = 0.0, use_rslora: bool = False, backend: str | None = None, *,
                exclude_modules: str | Iterable[str] | None = None, use_dora: bool = False) -> nn.Module:
    """Replace every targeted nn.Linear of `model` (bitsandbytes Linear4bit too: QLoRA on a model loaded in 4 bits)
    by a LoRALinear in place, freeze every other parameter
    (adapters of earlier injections, fastpeft's or PEFT's, keep their requires_grad) and return the model.

    target_modules / exclude_modules: PEFT's rules (fastpeft.targets): a regex matched against the whole
    module name, or a list of names matched as the name or its last dotted parts.
    All or nothing: every target and argument is checked before the model changes; a target that matches
    nothing, is not a plain nn.Linear, sits inside another adapter layer or inside a module that bypasses it
    (nn.MultiheadAttention's out_proj) raises, naming it and why.
    use_dora=True: PEFT's DoRA (LoraConfig(use_dora=True)) in every targeted layer (a DoRALinear, see
    fastpeft.LoRALinear), each magnitude initialised as PEFT does.
    """
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora: expected True or False, got {use_dora!r}")
    names = find_target_linears(model, target_modules, exclude_modules)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers = {name: LoRALinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout,
                                   use_rslora=use_rslora, backend=backend, use_dora=use_dora) for name in names}
    except BaseException:  # a bad argument: LoRALinear froze the base layers it got before raising
        for p, flag in trainable:
            p.requires_grad_(flag)
        raise
    freeze_all_but_adapters(model)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


__all__ = ["inject_lora", "count_parameters", "find_target_linears"]
