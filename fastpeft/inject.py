"""Put LoRA into a model that is already built, the way HF PEFT chooses target modules."""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .modules.lora import LoRALinear


def matches_target(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a module
    whose name equals an entry or ends with '.' + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_target_linears(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the modules `target_modules` selects; raises unless there is at least one and each is a plain
    nn.Linear without an adapter yet."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules: expected a regex string or a non-empty list of names, got {target_modules!r}")
    names = [n for n, m in model.named_modules() if n and matches_target(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules: {target_modules!r} matches no module of the model")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"target_modules: module {name!r} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target_modules: module {name!r} is a {type(module).__name__}; only nn.Linear can take LoRA")
    return names


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], r: int = 8, alpha: float = 16,
                dropout: float = 0.0, use_rslora: bool = False, backend: str | None = None) -> nn.Module:
    """Replace every targeted nn.Linear of `model` by a LoRALinear in place, freeze every other parameter
    and return the model. Raises if a target matches nothing or matches a module that is not an nn.Linear."""
    names = find_target_linears(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        set_submodule(model, name, LoRALinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout,
                                                use_rslora=use_rslora, backend=backend))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
