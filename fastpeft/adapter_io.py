"""save_adapter / load_adapter: fastpeft LoRA models in HF PEFT's on-disk format.

A directory holds adapter_model.safetensors (keys `base_model.model.<module path>.lora_A.weight` and
`...lora_B.weight`, as PEFT names them) and adapter_config.json (a PEFT LoraConfig), so PEFT loads what
fastpeft saves (PeftModel.from_pretrained) and fastpeft loads what PEFT saves (save_pretrained).

Saving is atomic (fastpeft.adapter_files): the files are written and fsynced in a scratch directory that
then takes the target's place in one rename, so a crash never leaves a half-written adapter where the old one
was; other files of the directory are kept, a symlink is followed, and the directory keeps its mode.
Loading validates the config and every key, shape, dtype and value of every layer against the model before
touching it (all or nothing), and names the file, layer and key that do not match.

Under torch.distributed (a process group of more than one rank): save_adapter is collective: call it on every
rank. Every rank gathers the full adapter (FSDP2-sharded LoRA weights are all-gathered with
DTensor.full_tensor(), so the file is the ordinary, unsharded PEFT format), the group's first rank writes it,
and a broadcast of the outcome acts as the barrier: no rank returns before the files are complete, and an
error of the writer is raised on every rank. distributed=False writes from the calling process alone (no
communication; refused for sharded weights). load_adapter runs on every rank, each reading the files: a
sharded (DTensor) LoRA weight takes its own shard of the file's tensor, without communication. A model
wrapped in DistributedDataParallel (or DataParallel, torch.compile) may be passed: its inner module's names
are used.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re

import torch
from torch import nn

from .adapter_files import fsync_path, write_directory, write_json
from .inject_lora import find_target_linears, inject_lora
from .modules.lora import LoRALinear, QLoRALinear
from .targets import is_linear4bit, matches_target

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
_SHOWN = 5  # names listed in an error message before "... and N more"

# config fields whose non-default values describe adapters fastpeft's LoRALinear cannot represent
_UNSUPPORTED = {
    "fan_in_fan_out": (False, None), "bias": ("none", None), "lora_bias": (False, None),
    "modules_to_save": (None, []), "layers_to_transform": (None, []), "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None), "target_parameters": (None, []), "trainable_token_indices": (None,),
    "megatron_config": (None,), "use_qalora": (False, None), "alora_invocation_tokens": (None,),
    "arrow_config": (None,), "use_bdlora": (None, False), "layer_replication": (None, []),
    "kasa_config": (None,), "velora_config": (None,), "monteclora_config": (None,),
}


# ------------------------------------------------------------------------------------------ the model side


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile's wrapper: PEFT's names are the
    plain model's (no `module.` or `_orig_mod.` prefix)."""
    from .distributed import unwrap

    return unwrap(model)


def _is_dtensor(t) -> bool:
    from .distributed import is_dtensor

    return is_dtensor(t)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of t; a DTensor (FSDP2) is all-gathered first (a collective: every rank calls it)."""
    t = t.detach()
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.to("cpu").contiguous()


def _plain_module_names(model: nn.Module, lora: dict[str, LoRALinear]) -> list[str]:
    """Module names as in the model without LoRA: a LoRALinear stands where its Linear stood."""
    inner = {f"{n}.{sub}" for n, m in lora.items() for sub, _ in m.named_modules() if sub}
    return [n for n, _ in model.named_modules() if n and n not in inner]


def _listing(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def adapter_config(model: nn.Module, *, base_model_name_or_path: str | None = None,
                   task_type: str | None = None) -> dict:
    """The PEFT LoraConfig (as a dict) describing the LoRA layers of a fastpeft model."""
    model = _unwrap(model)
    lora = _lora_layers(model)
    if not lora:
        raise ValueError(f"model: expected a model with fastpeft LoRALinear layers (fastpeft.inject_lora), "
                         f"found none in {type(model).__name__}")
    fields = {"r": lambda m: m.r, "lora_alpha": lambda m: m.lora_alpha, "lora_dropout": lambda m: m.lora_dropout,
              "use_rslora": lambda m: m.use_rslora, "use_dora": lambda m: m.use_dora}
    first_name, first = next(iter(lora.items()))
    for field, get in fields.items():
        other = [n for n, m in lora.items() if get(m) != get(first)]
        if other:
            raise ValueError(f"model: PEFT's adapter_config.json holds one {field} for all layers; {first_name} has "
                             f"{field}={get(first)} but {_listing(other)} differ(s) (e.g. {get(lora[other[0]])})")
    lora_names = set(lora)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in lora_names})
    plain = _plain_module_names(model, lora)
    if {n for n in plain if matches_target(n, suffixes)} == lora_names:
        target = suffixes
    else:  # the short names would also match layers without LoRA: name the layers exactly
        target = "(?:" + "|".join(re.escape(n) for n in sorted(lora_names)) + ")"
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "r": first.r, "lora_alpha": _number(first.lora_alpha), "lora_dropout": first.lora_dropout,
        "use_rslora": first.use_rslora, "target_modules": target,
        "fan_in_fan_out": False, "bias": "none", "use_dora": first.use_dora, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of a fastpeft model under PEFT's key names (detached CPU tensors; FSDP2-sharded weights
    are gathered, which is a collective: call it on every rank then)."""
    out = {}
    for name, m in _lora_layers(_unwrap(model)).items():
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = _full(m.lora_A)
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = _full(m.lora_B)
        if m.use_dora:  # DoRA: PEFT's file key of the magnitude vector
            out[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = _full(m.lora_magnitude_vector)
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 task_type: str | None = None, distributed: bool | None = None, process_group=None) -> str:
    """Write the LoRA adapter of a fastpeft model in PEFT's format: `directory`/adapter_model.safetensors and
    adapter_config.json, atomically (other files already in `directory` are kept, and its mode; a symlink is
    followed). Returns the directory written (the link's target for a symlink).

    base_model_name_or_path defaults to model.config._name_or_path when the model has one; task_type is
    PEFT's (e.g. "CAUSAL_LM", "SEQ_CLS") or None.

    distributed: None (default): collective when torch.distributed is initialized and process_group (default
    the world) has more than one rank: call it on every rank; sharded weights are gathered, the group's first
    rank writes, and every rank returns once the files are complete (the outcome is broadcast: a barrier that
    also carries the writer's error to every rank). False: this process writes alone, without communication
    (replicated weights only, e.g. `if rank == 0: save_adapter(model, d, distributed=False)`).
    """
    from safetensors.torch import save_file

    from .distributed import is_distributed

    collective = is_distributed(process_group) if distributed is None else bool(distributed)
    if collective and not is_distributed(process_group):
        raise ValueError("distributed=True: torch.distributed is not initialized with more than one rank")
    inner = _unwrap(model)
    if not collective:
        sharded = [n for n, p in inner.named_parameters() if "lora_" in n and _is_dtensor(p)]
        if sharded:
            raise ValueError(f"distributed=False: the LoRA weights {sharded[:3]} are sharded (DTensor, FSDP2): "
                             "gathering them is collective; call save_adapter on every rank (distributed=None)")
    config = adapter_config(inner, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    tensors = adapter_state_dict(inner)  # every rank: the all-gathers of sharded weights are collective

    def write(tmp: str) -> None:
        weights = os.path.join(tmp, WEIGHTS_NAME)
        save_file(tensors, weights, metadata={"format": "pt"})
        fsync_path(weights)
        write_json(os.path.join(tmp, CONFIG_NAME), config)

    # a stale adapter_model.bin would hold the old weights: not carried over
    replaced = {WEIGHTS_NAME, CONFIG_NAME, LEGACY_WEIGHTS_NAME}
    if not collective:
        return write_directory(directory, write, replaced=replaced)
    dist = torch.distributed
    src = dist.get_global_rank(process_group if process_group is not None else dist.group.WORLD, 0)
    outcome = [None, None]  # (the directory written, the writer's error)
    exc = None
    if dist.get_rank() == src:
        try:
            outcome[0] = write_directory(directory, write, replaced=replaced)
        except Exception as e:  # noqa: BLE001 - carried to every rank, re-raised as it is here
            exc, outcome[1] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(outcome, src=src, group=process_group)  # the barrier
    if exc is not None:
        raise exc
    if outcome[1] is not None:
        raise RuntimeError(f"save_adapter: rank {src} failed to write {os.fspath(directory)}: {outcome[1]}")
    return outcome[0]


# ------------------------------------------------------------------------------------------ loading


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"directory: {directory} has no {CONFIG_NAME}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark, as Windows editors write, is skipped
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _check_config(cfg: dict, path: str) -> dict:
    """The fields fastpeft needs, validated: r, lora_alpha, lora_dropout, use_rslora, target/exclude modules."""
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type: expected 'LORA', got {cfg.get('peft_type')!r}")
    for field, defaults in _UNSUPPORTED.items():
        if field in cfg and cfg[field] not in defaults:
            raise ValueError(f"{path}: {field}={cfg[field]!r} is not supported by fastpeft's LoRALinear "
                             f"(supported: {' or '.join(map(repr, defaults))})")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: r: expected an int >= 1, got {r!r}")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"{path}: lora_alpha: expected a finite number, got {alpha!r}")
    p = cfg.get("lora_dropout", 0.0)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{path}: lora_dropout: expected a number in [0, 1), got {p!r}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"{path}: use_rslora: expected true or false, got {rslora!r}")
    target = cfg.get("target_modules")
    if isinstance(target, str):
        if target in ("all-linear", "all_linear"):
            raise ValueError(f"{path}: target_modules='all-linear' is not expanded here; save the adapter with the "
                             "module names PEFT chose")
    elif not (isinstance(target, list) and target and all(isinstance(t, str) for t in target)):
        raise ValueError(f"{path}: target_modules: expected a regex string or a non-empty list of names, got {target!r}")
    exclude = cfg.get("exclude_modules")
    if exclude is not None and not (isinstance(exclude, str) or (
            isinstance(exclude, list) and all(isinstance(t, str) for t in exclude))):
        raise ValueError(f"{path}: exclude_modules: expected a regex string, a list of names or null, got {exclude!r}")
    for field, value in (("target_modules", target), ("exclude_modules", exclude)):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{path}: {field}: {value!r} is not a valid regex ({exc})") from exc
    dora = cfg.get("use_dora", False)
    if not isinstance(dora, bool):
        raise ValueError(f"{path}: use_dora: expected true or false, got {dora!r}")
    return {"r": r, "lora_alpha": float(alpha), "lora_dropout": float(p), "use_rslora": rslora,
            "target_modules": target, "exclude_modules": exclude or None, "use_dora": dora}


def _read_tensors(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        try:
            return path, load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
            raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{legacy}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{legacy}: expected a dict of tensors")
        return legacy, state
    raise FileNotFoundError(f"directory: {directory} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def _adapter_home(base: nn.Module) -> torch.Tensor:
    """A tensor with the device and dtype inject_lora gives the adapters of `base`: its weight's, or for a
    bitsandbytes 4-bit base (whose weight holds packed codes) its compute dtype (QLoRALinear)."""
    if is_linear4bit(base):
        return torch.empty(0, device=base.weight.device, dtype=QLoRALinear._adapter_dtype(base, None))
    return base.weight


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter directory (PEFT's save_pretrained or fastpeft.save_adapter) into `model`.

    If `model` has fastpeft LoRALinear layers, they must be exactly the layers the config targets, with its
    r, lora_alpha, lora_dropout and use_rslora. If it has none, they are injected first (fastpeft.inject_lora,
    with `backend`). Every key, shape, dtype and value of every layer is checked before anything changes: on
    any mismatch this raises ValueError naming the file, layer and key, and the model is left as it was.
    Returns the model.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory: {directory} is not a directory")
    cfg_path = os.path.join(directory, CONFIG_NAME)
    cfg = _check_config(_read_config(directory), cfg_path)
    wrapped, model = model, _unwrap(model)
    lora = _lora_layers(model)
    if not lora and wrapped is not model:
        raise ValueError(f"model: {type(wrapped).__name__} wraps a model without LoRA layers; load_adapter would "
                         "inject them behind the wrapper's back: inject (or load) before wrapping")
    plain = _plain_module_names(model, lora)
    targets = {n for n in plain if matches_target(n, cfg["target_modules"], cfg["exclude_modules"])}
    if not targets:
        raise ValueError(f"{cfg_path}: target_modules={cfg['target_modules']!r} matches no module of "
                         f"{type(model).__name__}")
    if lora:
        if set(lora) != targets:
            extra, missing = sorted(set(lora) - targets), sorted(targets - set(lora))
            raise ValueError(f"{cfg_path}: target_modules={cfg['target_modules']!r} does not match the model's LoRA "
                             f"layers: " + "; ".join(
                                 s for s in (f"layers with LoRA it does not target: {_listing(extra)}" if extra else "",
                                             f"targeted layers without LoRA: {_listing(missing)}" if missing else "")
                                 if s))
        expected_scaling = {"r": lambda m: m.r, "lora_alpha": lambda m: m.lora_alpha,
                            "lora_dropout": lambda m: m.lora_dropout, "use_rslora": lambda m: m.use_rslora,
                            "use_dora": lambda m: m.use_dora}
        for name, m in lora.items():
            for field, get in expected_scaling.items():
                if get(m) != cfg[field]:
                    raise ValueError(f"{cfg_path}: {field}: the config has {cfg[field]!r} but layer {name} has "
                                     f"{get(m)!r}")
            if m.merged:
                raise ValueError(f"model: layer {name} is merged; unmerge() it before loading an adapter")
        shapes = {n: (m.in_features, m.out_features) for n, m in lora.items()}
    else:
        not_linear = [n for n in targets if not isinstance(model.get_submodule(n), nn.Linear)]
        if not_linear:
            raise ValueError(f"{cfg_path}: target_modules={cfg['target_modules']!r} matches modules that are not "
                             f"nn.Linear: {_listing(not_linear)}")
        pattern = "(?:" + "|".join(re.escape(n) for n in sorted(targets)) + ")"
        try:  # inject_lora's own checks (nested adapters, bypassed layers, hooks), before anything changes
            find_target_linears(model, pattern)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cfg_path}: the adapter's layers cannot be injected into {type(model).__name__}: "
                             f"{exc}") from exc
        shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in targets}
    # the dtype and device each tensor is copied to: the LoRA layer's, or the base weight's for a layer to inject
    homes = {n: (lora[n].lora_A if lora else _adapter_home(model.get_submodule(n))) for n in shapes}

    weights_path, tensors = _read_tensors(directory)
    r = cfg["r"]
    expected = {}
    for name, (fan_in, fan_out) in shapes.items():
        expected[f"{KEY_PREFIX}{name}.lora_A.weight"] = (name, "A", (r, fan_in))
        expected[f"{KEY_PREFIX}{name}.lora_B.weight"] = (name, "B", (fan_out, r))
        if cfg["use_dora"]:
            expected[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = (name, "M", (fan_out,))
    tensors = {k[:-7] if k.endswith(".lora_magnitude_vector.weight") else k: v for k, v in tensors.items()}
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        parts = [f"missing keys: {_listing(missing)}" if missing else "",
                 f"unexpected keys: {_listing(unexpected)}" if unexpected else ""]
        raise ValueError(f"{weights_path}: the keys do not match the model's LoRA layers; "
                         + "; ".join(p for p in parts if p))
    # every tensor of every layer checked and converted before the first write: all or nothing
    ready = {}
    for key, (name, which, shape) in expected.items():
        t, home = tensors[key], homes[name]
        where = f"{weights_path}: layer {name}: {key}"
        if tuple(t.shape) != shape:
            dims = {"A": "lora_A is [r, in_features]", "B": "lora_B is [out_features, r]",
                    "M": "lora_magnitude_vector is [out_features]"}[which]
            raise ValueError(f"{where}: expected shape {list(shape)}, got {list(t.shape)} ({dims})")
        if not t.is_floating_point():
            raise ValueError(f"{where}: expected a floating-point tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: contains NaN or infinite values")
        converted = t.to(device=home.device, dtype=home.dtype)
        if not torch.isfinite(converted).all():
            raise ValueError(f"{where}: does not fit {home.dtype}, the layer's dtype (largest magnitude "
                             f"{t.abs().max().item():g} becomes infinite)")
        ready[key] = (name, which, converted)

    # only now is the model changed; inject_lora is all or nothing, and copies of checked tensors cannot fail
    if not lora:
        inject_lora(model, target_modules=pattern, r=r, alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                    use_rslora=cfg["use_rslora"], backend=backend, use_dora=cfg["use_dora"])
        lora = _lora_layers(model)
    with torch.no_grad():
        for name, which, value in ready.values():
            param = getattr(lora[name], {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}[which])
            if _is_dtensor(param):  # FSDP2: this rank's shard of the file's tensor, no communication
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(value)
    return wrapped


__all__ = ["save_adapter", "load_adapter", "adapter_config", "adapter_state_dict"]
