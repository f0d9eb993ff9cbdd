"""Which modules an injector may change: PEFT's target_modules rules and the refusals every injector shares.

Used by inject_lora, inject_multi_lora, inject_adapters, galore.enable and load_adapter, so that a name
selects the same modules everywhere and a target that could not work is refused with the same reason.

Matching (PEFT's `check_target_module_exists`): a string is a regex that must match the whole qualified
module name (re.fullmatch); a list matches a module whose name equals an entry or ends with "." + entry.
exclude_modules, by the same rules, removes modules from the selection.

Refusals (`refusal`): a target inside an adapter layer (fastpeft's or PEFT's: adapters would nest, and a
fused layer never calls its base layer), inside an nn.MultiheadAttention (which reads its weights directly),
reachable under several names (it would be replaced in one place only), or, for injectors whose new layer
never calls the module, carrying hooks or a forward of its own (they would silently stop running).

fastpeft's adapter layers say what they are with the class attribute `_fastpeft_adapter`: "fused" for the
layers that compute with their base layer's weight and never call it (LoRALinear, IA3Linear,
MultiLoRALinear), "adapter" for BottleneckAdapter, "wrapper" for the layers that call a wrapped module and add
an adapter to its output (SeriesAdapterLayer, ParallelAdapterLayer). Inside a wrapper's base layer, LoRA,
multi-LoRA and GaLore work as anywhere (the wrapper calls it); only a second bottleneck adapter is refused there.
"""
from __future__ import annotations

import re
from typing import Iterable

from torch import nn

REPLACE, WRAP, IN_PLACE = "replace", "wrap", "in_place"  # how an injector changes the module it targets


def check_targets(target_modules, arg: str = "target_modules") -> str | list[str]:
    """target_modules as a regex string (checked to compile) or a non-empty list of names; raises otherwise."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"{arg}: {target_modules!r} is not a valid regex ({exc})") from exc
        return target_modules
    if isinstance(target_modules, (bytes, dict)) or not isinstance(target_modules, Iterable):
        raise TypeError(f"{arg}: expected a list of names or a regex string, got {type(target_modules).__name__}")
    names = list(target_modules)
    if not names or not all(isinstance(t, str) for t in names):
        raise ValueError(f"{arg}: expected a regex string or a non-empty list of names, got {names!r}")
    return names


def matches_target(name: str, target_modules: str | Iterable[str], exclude_modules=None) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a module
    whose name equals an entry or ends with '.' + entry. A module exclude_modules matches (same rules) is out."""
    if exclude_modules and matches_target(name, exclude_modules):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def select(model: nn.Module, target_modules, exclude_modules=None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every sub-module (not the model itself) the targets select, in model order."""
    return [(n, m) for n, m in model.named_modules() if n and matches_target(n, target_modules, exclude_modules)]


def select_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[tuple[str, nn.Module]]:
    """select() after checking both arguments; raises when nothing is selected (an injector's first step)."""
    target_modules = check_targets(target_modules)
    if exclude_modules is not None:
        exclude_modules = check_targets(exclude_modules, "exclude_modules")
    chosen = select(model, target_modules, exclude_modules)
    if not chosen:
        raise ValueError(f"target_modules: {target_modules!r} matches no module of the model")
    return chosen


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name under which `model` reaches it (a module registered twice has two)."""
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    return aliases


def peft_layer(m: nn.Module) -> bool:
    """Whether m is a PEFT adapter layer (a BaseTunerLayer), without importing peft."""
    return any(c.__name__ == "BaseTunerLayer" and c.__module__.startswith("peft.") for c in type(m).__mro__)


def bnb_linear4bit_class(m: nn.Module) -> type | None:
    """bitsandbytes' Linear4bit class in the MRO of m's class (Linear4bit itself for LinearNF4 / LinearFP4), or
    None; without importing bitsandbytes."""
    for c in type(m).__mro__:
        if c.__name__ == "Linear4bit" and c.__module__.split(".")[0] == "bitsandbytes":
            return c
    return None


def is_linear4bit(m: nn.Module) -> bool:
    """Whether m is a bitsandbytes 4-bit linear (Linear4bit, LinearNF4, LinearFP4) running bitsandbytes' own
    forward: a base that LoRALinear computes with (it dequantizes W0 as bitsandbytes does, never calling it).
    A subclass with a forward of its own is not: the LoRA layer would bypass that forward."""
    cls = bnb_linear4bit_class(m)
    return cls is not None and type(m).forward is cls.forward


def adapter_kind(m: nn.Module) -> str | None:
    """'fused' / 'adapter' for fastpeft's adapter layers (see the module docstring), 'peft' for PEFT's, else None."""
    kind = getattr(type(m), "_fastpeft_adapter", None)
    if kind is not None:
        return kind
    return "peft" if peft_layer(m) else None


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _enclosing(model: nn.Module, name: str, noun: str, how: str) -> str | None:
    """Why a module inside one of `name`'s ancestors (nearest first, the model itself last) cannot take `noun`."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        anc_name = ".".join(parts[:depth])
        anc = model.get_submodule(anc_name)
        shown = repr(anc_name) if anc_name else "the model itself"
        kind = adapter_kind(anc)
        if kind == "fused":
            return (f"it is inside {shown}, a fastpeft {type(anc).__name__}, which computes with its base layer's "
                    "weight and never calls it: a nested adapter would never change the output")
        if kind == "wrapper" and how != WRAP:
            continue  # the wrapper calls its base layer: what is injected inside it runs
        if kind in ("adapter", "wrapper"):
            return (f"it is inside {shown}, a fastpeft {type(anc).__name__}: adapters would nest (such layers wrap "
                    "their module already); target the layer itself")
        if kind == "peft":
            return (f"it is inside {shown}, a PEFT adapter layer ({type(anc).__name__}): adapters would nest, and "
                    "patch_peft's fused forward reads the base layer's weight directly")
        if isinstance(anc, nn.MultiheadAttention):
            return (f"it is inside {shown}, an nn.MultiheadAttention, which reads its weight directly and never "
                    f"calls it: {noun} there would have no effect and get no gradient")
    return None


def refusal(model: nn.Module, name: str, module: nn.Module, aliases: dict[int, list[str]] | None = None, *,
            how: str, noun: str) -> str | None:
    """Why the injector cannot change `module` (at `name` in `model`), or None; `noun` names what it adds
    ("LoRA", "an adapter", ...) and `how` is how it changes the module:
    REPLACE: a new layer takes its place and computes with its weights without calling it (LoRA, multi-LoRA);
    WRAP: a new layer takes its place and calls it (bottleneck adapters);
    IN_PLACE: the module itself changes class (gradient-free GaLore)."""
    if how not in (REPLACE, WRAP, IN_PLACE):
        raise ValueError(f"how: expected one of {(REPLACE, WRAP, IN_PLACE)}, got {how!r}")
    if how != IN_PLACE:  # a module changed in place is changed under every name
        aliases = module_aliases(model) if aliases is None else aliases
        others = [a for a in aliases.get(id(module), [name]) if a != name]
        if others:
            return f"module {name!r} is the same module as {_quoted(others)}; {noun} would replace it in one place only"
    if how == REPLACE and (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                           or module._backward_pre_hooks or "forward" in vars(module)):
        return (f"module {name!r} has forward or backward hooks or a forward of its own; the {noun} layer never "
                "calls it, so they would silently stop running")
    if how == IN_PLACE and "forward" in vars(module):
        return (f"module {name!r} has a forward of its own (an instance attribute), which would hide the "
                f"{noun} layer's forward")
    why = _enclosing(model, name, noun, how)
    return None if why is None else f"module {name!r} cannot take {noun}: {why}"


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of the adapter layers (fastpeft's or PEFT's) already in `model`, not of the base
    layers they hold: an injection freezes every other parameter, and these keep their requires_grad."""
    return {id(p) for m in model.modules() if adapter_kind(m) is not None
            for n, p in m.named_parameters() if not n.startswith("base_layer.")}


def freeze_all_but_adapters(model: nn.Module, keep: set[int] | None = None) -> None:
    """requires_grad=False for every parameter of `model` outside its adapter layers (or outside `keep`)."""
    keep = adapter_parameter_ids(model) if keep is None else keep
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model` (the parent must exist)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


__all__ = ["check_targets", "matches_target", "select", "module_aliases", "adapter_kind", "peft_layer", "refusal",
           "is_linear4bit", "bnb_linear4bit_class",
           "adapter_parameter_ids", "freeze_all_but_adapters", "set_submodule", "REPLACE", "WRAP", "IN_PLACE"]
