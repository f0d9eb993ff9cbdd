"""fastpeft.inject_adapters: put bottleneck adapters after (series) or around (parallel) named sub-modules.

Module names match the way PEFT matches a list of target_modules (fastpeft.targets): a name matches a module
whose qualified name equals it or ends with "." + it.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_finite_number, check_positive_int
from .modules.adapter import BottleneckAdapter
from .targets import WRAP, freeze_all_but_adapters, matches_target, module_aliases, refusal, select

KINDS = ("series", "parallel")


def _first_tensor(out, where: str):
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0], out[1:]
    raise TypeError(f"{where}: expected the wrapped module to return a tensor or a tuple whose first element is a "
                    f"tensor, got {type(out).__name__}")


class SeriesAdapterLayer(nn.Module):
    """base_layer's output h (or its first element) becomes h + s·up(act(down(h)))."""

    _fastpeft_adapter = "wrapper"  # calls base_layer: LoRA may go inside it, a second adapter not (fastpeft.targets)

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        h, rest = _first_tensor(self.base_layer(*args, **kwargs), "SeriesAdapterLayer")
        y = self.adapter(h)
        return y if rest is None else (y,) + tuple(rest)


class ParallelAdapterLayer(nn.Module):
    """Output base_layer(x) + s·up(act(down(x))), x the first positional argument (He et al.)."""

    _fastpeft_adapter = "wrapper"  # calls base_layer: LoRA may go inside it, a second adapter not (fastpeft.targets)

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x, *args, **kwargs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ParallelAdapterLayer: expected the first argument to be the sub-layer's input tensor, "
                            f"got {type(x).__name__}")
        out, rest = _first_tensor(self.base_layer(x, *args, **kwargs), "ParallelAdapterLayer")
        if out.shape != x.shape:
            raise ValueError(f"ParallelAdapterLayer: a parallel adapter needs the module's output shape to equal its "
                             f"input shape, got input {tuple(x.shape)} and output {tuple(out.shape)}")
        y = self.adapter(x, residual=out)
        return y if rest is None else (y,) + tuple(rest)


def _refusal(model: nn.Module, name: str, module: nn.Module, aliases: dict) -> str | None:
    """Why an adapter at `name` would nest inside another adapter or never act, or None."""
    if isinstance(module, (SeriesAdapterLayer, ParallelAdapterLayer, BottleneckAdapter)):
        return (f"module {name!r} already is a fastpeft {type(module).__name__}: an adapter there would wrap an "
                "adapter layer; target a different module")
    return refusal(model, name, module, aliases, how=WRAP, noun="an adapter")


def _infer_d_model(model: nn.Module, module: nn.Module, kind: str, name: str) -> int:
    feat = getattr(module, "in_features" if kind == "parallel" else "out_features", None)
    if isinstance(feat, int):
        return feat
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"d_model: cannot infer the width of module {name!r} ({type(module).__name__}); pass d_model=")


def _param_like(model: nn.Module, module: nn.Module):
    for m in (module, model):
        for p in m.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return None, None


def inject_adapters(model: nn.Module, after=None, around=None, bottleneck: int = 64, kind: str | None = None,
                    scaling: float = 1.0, activation: str = "gelu", layer_norm: bool = False, bias: bool = True,
                    d_model: int | None = None, backend=None) -> nn.Module:
    """Insert a BottleneckAdapter at every module named in `after` (kind="series": the module's output h
    becomes h + s·adapter(h)) or `around` (kind="parallel": output = module(x) + s·adapter(x)). The new
    adapters train; adapters of earlier injections (fastpeft's or PEFT's) keep their requires_grad; every other
    parameter is frozen. Returns the model (modified in place).

    Names match like a list of PEFT's target_modules: equal to a module's qualified name or a suffix after a "."
    (a single string is one name).
    d_model defaults to the module's out_features (in_features for parallel), else model.config.hidden_size.
    Adapters take the dtype and device of the module's parameters.
    All or nothing: every target is checked, and every adapter built, before the model changes. Refused,
    naming the module and why: a target that already is an adapter layer, sits inside one (fastpeft's or
    PEFT's), is registered under several names, or that its parent never calls (nn.MultiheadAttention's
    out_proj); a width that does not fit the module.
    """
    if kind is None:
        kind = "parallel" if around is not None and after is None else "series"
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    targets = after if kind == "series" else around
    other, other_name = (around, "around") if kind == "series" else (after, "after")
    if other is not None:
        raise ValueError(f"{other_name}: a {kind} adapter takes its module names from "
                         f"{'after' if kind == 'series' else 'around'}=, got {other_name}={other!r}")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{'after' if kind == 'series' else 'around'}: expected a non-empty list of module names, "
                         f"got {targets!r}")
    bottleneck = check_positive_int("bottleneck", bottleneck)
    scaling = check_finite_number("scaling", scaling)
    if d_model is not None:
        d_model = check_positive_int("d_model", d_model)

    arg = "after" if kind == "series" else "around"
    found = select(model, targets)
    missing = [t for t in targets if not any(matches_target(n, [t]) for n, _ in found)]
    if missing:
        raise ValueError(f"{arg}: no module of the model matches {missing} "
                         f"(a name matches a module named exactly so or ending in '.' + name)")
    aliases = module_aliases(model)

    wrapper = SeriesAdapterLayer if kind == "series" else ParallelAdapterLayer
    # check every target, resolve every parent and build every adapter before replacing anything: a matched
    # module may sit inside another matched one, and nothing may change if one of them is refused
    sites = []
    for name, module in found:
        why = _refusal(model, name, module, aliases)
        if why is not None:
            raise ValueError(f"{arg}: {why}")
        width = d_model if d_model is not None else _infer_d_model(model, module, kind, name)
        fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if kind == "parallel" and isinstance(fin, int) and isinstance(fout, int) and fin != fout:
            raise ValueError(f"around: module {name!r} maps {fin} features to {fout}: a parallel adapter needs the "
                             "module's output shape to equal its input shape")
        own = fout if kind == "series" else fin
        if isinstance(own, int) and width != own:
            raise ValueError(f"d_model: module {name!r} has {'out' if kind == 'series' else 'in'}_features={own}, "
                             f"got d_model={width}")
        device, dtype = _param_like(model, module)
        try:
            ad = BottleneckAdapter(width, bottleneck, activation=activation, scaling=scaling, layer_norm=layer_norm,
                                   bias=bias, device=device, dtype=dtype, backend=backend)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{arg}: module {name!r}: {exc}") from exc
        parent_name, _, child = name.rpartition(".")
        sites.append((model.get_submodule(parent_name) if parent_name else model, child, wrapper(module, ad)))

    freeze_all_but_adapters(model)  # adapters of earlier injections keep their requires_grad
    for parent, child, layer in sites:
        setattr(parent, child, layer)
    for _, _, layer in sites:
        layer.adapter.requires_grad_(True)
    return model


__all__ = ["inject_adapters", "SeriesAdapterLayer", "ParallelAdapterLayer"]
