"""Put LoRA into a model that is already built, the way HF PEFT chooses target modules."""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .modules.adapter import BottleneckAdapter
from .modules.ia3 import IA3Linear
from .modules.lora import LoRALinear
from .modules.multi_lora import MultiLoRALinear


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


def _bypassing_parent(model: nn.Module, name: str) -> str | None:
    """Why a LoRA layer at `name` would never act because a module above it does not call it, or None."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        anc_name = ".".join(parts[:depth])
        anc = model.get_submodule(anc_name)
        shown = repr(anc_name) if anc_name else "the model itself"
        if isinstance(anc, (LoRALinear, IA3Linear, MultiLoRALinear)):
            return (f"it is inside {shown}, a fastpeft {type(anc).__name__}, which computes with its base layer's "
                    "weight and never calls it: a nested adapter would never change the output")
        if any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.") for c in type(anc).__mro__):
            return (f"it is inside {shown}, a PEFT adapter layer ({type(anc).__name__}): adapters would nest, and "
                    "patch_peft's fused forward reads the base layer's weight directly")
        if isinstance(anc, nn.MultiheadAttention):
            return (f"it is inside {shown}, an nn.MultiheadAttention, which reads its weight directly and never "
                    "calls it: LoRA there would have no effect and get no gradient")
    return None


def find_target_linears(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the modules `target_modules` selects; raises, before anything changes, unless there is at least
    one and each is a plain nn.Linear, without an adapter yet, that the model really calls where it stands."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules: expected a regex string or a non-empty list of names, got {target_modules!r}")
    else:
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regex ({exc})") from exc
    names = [n for n, m in model.named_modules() if n and matches_target(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules: {target_modules!r} matches no module of the model")
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"target_modules: module {name!r} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target_modules: module {name!r} is a {type(module).__name__}; only nn.Linear can take LoRA")
        if type(module).forward is not nn.Linear.forward:
            raise TypeError(f"target_modules: module {name!r} is a {type(module).__name__} with its own forward; "
                            "the LoRA layer computes x·Wᵀ + b itself and would bypass it")
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in vars(module)):
            raise ValueError(f"target_modules: module {name!r} has forward or backward hooks or a forward of its "
                             "own; the LoRA layer never calls it, so they would silently stop running")
        others = [a for a in aliases[id(module)] if a != name]
        if others:
            raise ValueError(f"target_modules: module {name!r} is the same module as {_quoted(others)}; LoRA would "
                             "replace it in one place only")
        why = _bypassing_parent(model, name)
        if why is not None:
            raise ValueError(f"target_modules: module {name!r} cannot take LoRA: {why}")
    return names


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _adapter_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of fastpeft adapter layers already in `model` (not of the layers they wrap)."""
    keep = set()
    for m in model.modules():
        if isinstance(m, (LoRALinear, IA3Linear, MultiLoRALinear, BottleneckAdapter)):
            keep.update(id(p) for n, p in m.named_parameters() if not n.startswith("base_layer."))
    return keep


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], r: int = 8, alpha: float = 16,
                dropout: float = 0.0, use_rslora: bool = False, backend: str | None = None) -> nn.Module:
    """Replace every targeted nn.Linear of `model` by a LoRALinear in place, freeze every other parameter
    (adapters of earlier fastpeft injections keep their requires_grad) and return the model.

    All or nothing: every target and argument is checked before the model changes; a target that matches
    nothing, is not a plain nn.Linear, sits inside another adapter layer or inside a module that bypasses it
    (nn.MultiheadAttention's out_proj) raises, naming it and why.
    """
    names = find_target_linears(model, target_modules)
    keep = _adapter_parameters(model)
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers = {name: LoRALinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout,
                                   use_rslora=use_rslora, backend=backend) for name in names}
    except BaseException:  # a bad argument: LoRALinear froze the base layers it got before raising
        for p, flag in trainable:
            p.requires_grad_(flag)
        raise
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
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
