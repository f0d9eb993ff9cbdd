"""Serve (or train) many LoRA adapters over one model: inject_multi_lora and PEFT's mixed-batch call style.

    model = fastpeft.inject_multi_lora(model, ["q_proj", "v_proj"], adapters={"user_a": path_or_state_dict, ...})
    model(input_ids, adapter_names=["user_a", "user_b", "__base__", ...])    # one name per sequence
    with fastpeft.multi_lora_batch(model, names): model.generate(...)          # the same, for any call

Adapters are PEFT adapter directories (adapter_config.json + adapter_model.safetensors / .bin), such files,
or state dicts in PEFT's or fastpeft's key layout. Each adapter gets one slot id, the same in every layer;
load_multi_adapter / unload_multi_adapter change the set at run time without recompiling anything.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from typing import Iterable, Mapping

import torch
from torch import nn

from ._checks import check_finite_number, check_positive_int
from .inject_lora import find_target_linears
from .modules.multi_lora import MultiLoRALinear
from .targets import freeze_all_but_adapters, set_submodule

BASE_NAME = "__base__"
_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")


class MultiLoRARegistry:
    """The adapters of a model injected with inject_multi_lora: name -> slot, the layers, the ids of the current call."""

    def __init__(self, layers: dict[str, MultiLoRALinear], capacity: int):
        self.layers = layers
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.ids: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).base_layer.weight.device

    def ids_for(self, adapter_names) -> torch.Tensor:
        """One id per name (BASE_NAME or None: base only), on the model's device; unknown names raise."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names: expected a list of adapter names (one per sequence), got {type(adapter_names).__name__}")
        ids = []
        for i, nm in enumerate(adapter_names):
            if nm is None or nm == BASE_NAME:
                ids.append(-1)
            elif nm in self.slots:
                ids.append(self.slots[nm])
            else:
                raise ValueError(f"adapter_names[{i}]: expected one of {sorted(self.slots)} or {BASE_NAME!r}, got {nm!r}")
        return torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True)


def _read_source(adapter: str, src) -> tuple[Mapping[str, torch.Tensor], dict, str]:
    """(state dict, adapter config or {}, where it came from) of a PEFT adapter directory, a .safetensors /
    .bin file or a state dict. Unreadable files raise naming the adapter and the file."""
    if isinstance(src, Mapping):
        return src, {}, "a state dict"
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"adapters[{adapter!r}]: expected a state dict or a path, got {type(src).__name__}")
    path = os.fspath(src)
    config = {}
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "adapter_config.json")
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 BOM some editors write is fine
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"adapters[{adapter!r}]: cannot read {cfg_path}: {e}") from e
            if not isinstance(config, dict):
                raise ValueError(f"adapters[{adapter!r}]: {cfg_path}: expected a JSON object, got {type(config).__name__}")
        for fname in ("adapter_model.safetensors", "adapter_model.bin"):
            if os.path.exists(os.path.join(path, fname)):
                path = os.path.join(path, fname)
                break
        else:
            raise ValueError(f"adapters[{adapter!r}]: {src!r} has neither adapter_model.safetensors nor adapter_model.bin")
    if not os.path.exists(path):
        raise ValueError(f"adapters[{adapter!r}]: {src!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path), config, path
        return torch.load(path, map_location="cpu", weights_only=True), config, path
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"adapters[{adapter!r}]: cannot read {path}: {type(e).__name__}: {e}") from e


def _adapter_tensors(adapter: str, sd: Mapping[str, torch.Tensor], targets: list[str], where: str) -> dict[str, list]:
    """target module name -> [A, B] of one adapter's state dict; LoRA keys that match no target raise."""
    out: dict[str, list] = {}
    seen_names = set()
    if not isinstance(sd, Mapping):
        raise ValueError(f"adapters[{adapter!r}] ({where}): expected a state dict, got {type(sd).__name__}")
    for key, t in sd.items():
        k = key[:-len(".weight")] if key.endswith(".weight") else key
        m = _KEY.match(k)
        if m is None:
            continue  # not a LoRA tensor (a base weight of a full state dict, a bias, ...)
        if m.group("adapter") is not None:
            seen_names.add(m.group("adapter"))
        mod = m.group("mod")
        if mod.startswith("base_model.model."):
            mod = mod[len("base_model.model."):]
        hits = [n for n in targets if n == mod or n.endswith("." + mod) or mod.endswith("." + n)]
        if len(hits) != 1:
            what = "no targeted module" if not hits else f"several targeted modules {hits}"
            raise ValueError(f"adapters[{adapter!r}] ({where}): key {key!r} matches {what}; check target_modules")
        out.setdefault(hits[0], [None, None])["AB".index(m.group("ab"))] = t
    if len(seen_names) > 1:
        raise ValueError(f"adapters[{adapter!r}] ({where}): the state dict holds several adapters {sorted(seen_names)}; "
                         f"pass one")
    if not out:
        raise ValueError(f"adapters[{adapter!r}] ({where}): no LoRA tensors (keys '<module>.lora_A[.weight]') in the "
                         f"state dict")
    for n, (a, b) in out.items():
        if a is None or b is None:
            raise ValueError(f"adapters[{adapter!r}] ({where}): layer {n!r} has lora_{'A' if a is None else 'B'} missing")
    return out


def _plan(layers: Mapping[str, MultiLoRALinear], adapter: str, sd, config: dict, where: str,
          alpha: float | None) -> dict[str, tuple]:
    """Validate every tensor of one adapter against every layer, writing nothing: target -> (A, B, scaling)."""
    tensors = _adapter_tensors(adapter, sd, list(layers), where)
    if alpha is None:
        alpha = config.get("lora_alpha")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"adapters[{adapter!r}] ({where}): use_rslora: expected true or false, got {rslora!r}")
    plan = {}
    for target, (a, b) in tensors.items():
        try:
            _, scaling = layers[target].check_adapter(a, b, alpha=alpha, use_rslora=rslora)
        except (TypeError, ValueError) as e:
            raise type(e)(f"adapters[{adapter!r}] ({where}): layer {target!r}: {e}") from None
        plan[target] = (a, b, scaling)
    return plan


def _apply(registry: MultiLoRARegistry, name: str, slot: int, plan: dict[str, tuple]) -> None:
    """Write a validated plan into `slot` of every layer (layers the adapter leaves alone: base only)."""
    for target, layer in registry.layers.items():
        if target in plan:
            a, b, scaling = plan[target]
            layer.load_adapter(slot, a, b, scaling=scaling, name=name)
        else:
            layer.unload_adapter(slot)
            layer.adapter_names[slot] = name
    registry.slots[name] = slot


def _max_rank(sources: Mapping[str, tuple]) -> int:
    r = 1
    for sd, _, _ in sources.values():
        for key, t in (sd.items() if isinstance(sd, Mapping) else ()):
            k = key[:-len(".weight")] if key.endswith(".weight") else key
            m = _KEY.match(k)
            if m is not None and m.group("ab") == "A" and isinstance(t, torch.Tensor) and t.dim() == 2:
                r = max(r, t.shape[0])
    return r


class _AdapterNamesForward:
    """model.forward after inject_multi_lora: model(..., adapter_names=[...]) runs the call inside
    multi_lora_batch; other calls are unchanged. An object rather than a closure, so that the model pickles
    and a deepcopy's forward is bound to the copy (a copied closure would still run the original)."""

    def __init__(self, model: nn.Module, inner=None):
        self.model = model
        self.inner = inner  # an instance-level forward that was there before (another wrapper), if any

    def _target(self):
        return self.inner if self.inner is not None else type(self.model).forward.__get__(self.model)

    def __call__(self, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return self._target()(*args, **kwargs)
        with multi_lora_batch(self.model, adapter_names):
            return self._target()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self._target())
        if "adapter_names" in sig.parameters:
            return sig
        params = list(sig.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
        return sig.replace(parameters=params)


def _wrap_forward(model: nn.Module) -> None:
    model.forward = _AdapterNamesForward(model, model.__dict__.get("forward"))


def inject_multi_lora(model: nn.Module, target_modules: str | Iterable[str], adapters: Mapping[str, object], *,
                      capacity: int | None = None, r: int | None = None, alpha: float | None = None,
                      alphas: Mapping[str, float] | None = None, backend: str | None = None,
                      exclude_modules: str | Iterable[str] | None = None) -> nn.Module:
    """Replace each targeted nn.Linear by a MultiLoRALinear holding every adapter of `adapters` (name -> PEFT
    adapter directory, .safetensors/.bin file, or state dict), freeze the base model and return it.

    Afterwards model(..., adapter_names=[one per sequence]) runs each sequence with its adapter ("__base__":
    none); adapters of earlier injections keep their requires_grad. target_modules / exclude_modules: PEFT's
    rules (fastpeft.targets). capacity: adapter slots (default len(adapters)); r: the pool's rank bound (default
    the largest rank found). Scaling per adapter: alphas[name], else the adapter config's lora_alpha, else
    alpha, else the rank (scaling 1), divided by the layer's rank (PEFT's rule). Every target and every tensor of every adapter
    is checked before the model is touched: after an error the model is unchanged (a retry may follow).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if hasattr(model, "_fastpeft_multi_lora"):
        raise ValueError("model: already injected with inject_multi_lora; use load_multi_adapter to add adapters")
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(f"adapters: expected a non-empty mapping name -> state dict or path, got {adapters!r:.80}")
    for nm in adapters:
        if not isinstance(nm, str) or not nm or nm == BASE_NAME:
            raise ValueError(f"adapters: expected non-empty adapter names other than {BASE_NAME!r}, got {nm!r}")
    alphas = dict(alphas or {})
    unknown = sorted(set(alphas) - set(adapters), key=str)
    if unknown:
        raise ValueError(f"alphas: expected names of adapters {sorted(adapters)}, got {unknown}")
    for nm, v in alphas.items():
        check_finite_number(f"alphas[{nm!r}]", v)
    if alpha is not None:
        alpha = check_finite_number("alpha", alpha)
    names = find_target_linears(model, target_modules, exclude_modules)
    capacity = len(adapters) if capacity is None else check_positive_int("capacity", capacity)
    if capacity < len(adapters):
        raise ValueError(f"capacity: expected at least {len(adapters)} (the number of adapters), got {capacity}")
    sources = {nm: _read_source(nm, src) for nm, src in adapters.items()}  # each file read once
    need = _max_rank(sources)
    r = need if r is None else check_positive_int("r", r)
    if r < need:
        raise ValueError(f"r: expected at least {need} (the largest adapter rank), got {r}")
    # new layers wrap (and freeze) the targets before they replace them: undo the freezing on any error
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers = {n: MultiLoRALinear(model.get_submodule(n), capacity, r=r, alpha=float(r if alpha is None else alpha),
                                     init_adapters=False, backend=backend) for n in names}
        plans = [(slot, nm, _plan(layers, nm, *sources[nm], alphas.get(nm, alpha))) for slot, nm in enumerate(adapters)]
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    # everything is valid: from here on nothing checks or raises on valid input
    freeze_all_but_adapters(model)  # adapters of earlier injections keep their requires_grad
    registry = MultiLoRARegistry(layers, capacity)
    for n, layer in layers.items():
        set_submodule(model, n, layer)
        layer._context = registry
    for slot, nm, plan in plans:
        _apply(registry, nm, slot, plan)
    model._fastpeft_multi_lora = registry
    _wrap_forward(model)
    return model


def _registry(model) -> MultiLoRARegistry:
    reg = getattr(model, "_fastpeft_multi_lora", None)
    if reg is None:
        raise ValueError("model: expected a model returned by fastpeft.inject_multi_lora")
    return reg


def load_multi_adapter(model: nn.Module, name: str, source, alpha: float | None = None) -> int:
    """Load (or replace) adapter `name` at run time into a free slot of every layer; returns its id."""
    reg = _registry(model)
    if not isinstance(name, str) or not name or name == BASE_NAME:
        raise ValueError(f"name: expected a non-empty adapter name other than {BASE_NAME!r}, got {name!r}")
    slot = reg.slots.get(name)
    if slot is None:
        used = set(reg.slots.values())
        slot = next((i for i in range(reg.capacity) if i not in used), None)
        if slot is None:
            raise ValueError(f"name: the pool's {reg.capacity} slots are all in use ({sorted(reg.slots)}); unload one first")
    if alpha is not None:
        alpha = check_finite_number("alpha", alpha)
    # every tensor of every layer is checked before any is written: after an error the model is unchanged
    plan = _plan(reg.layers, name, *_read_source(name, source), alpha)
    _apply(reg, name, slot, plan)
    return slot


def unload_multi_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; its slot is free for the next load."""
    reg = _registry(model)
    if name not in reg.slots:
        raise ValueError(f"name: expected one of {sorted(reg.slots)}, got {name!r}")
    slot = reg.slots.pop(name)
    for layer in reg.layers.values():
        layer.unload_adapter(slot)


@contextlib.contextmanager
def multi_lora_batch(model: nn.Module, adapter_names):
    """Within the block, every call of the model's multi-adapter layers uses these names (one per sequence)."""
    reg = _registry(model)
    previous = reg.ids
    reg.ids = reg.ids_for(adapter_names)
    try:
        yield model
    finally:
        reg.ids = previous
