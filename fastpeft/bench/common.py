"""What the op modules share: case helpers, the Impl an op's builder returns, the autograd-layer Impl
(fwd, bwd, fwd+bwd, inference), the torch.compile baseline and fastpeft's backend availability."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from .memory import reset_grads
from .opspec import expand
from .presets import DTYPES

COMPILED = "compiled"
COMPILED_DESCRIPTION = "torch.compile of the eager PyTorch version"


class Unavailable(Exception):
    """This implementation cannot run here; the message says why (recorded as a skip)."""


class CaseMixin:
    """Methods of every op's Case, a frozen dataclass with a `dtype` name and `tags` (compare=False)."""

    @property
    def key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        d.update(tags=list(self.tags), label=self.label)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def dedupe(cases: list) -> list:
    """Equal cases merged, keeping the first's place and the union of their tags."""
    merged: dict = {}
    for c in cases:
        if c.key in merged:
            old = merged[c.key]
            merged[c.key] = dataclasses.replace(old, tags=old.tags + tuple(t for t in c.tags if t not in old.tags))
        else:
            merged[c.key] = c
    return list(merged.values())


def around(headline, axes: dict, tag_prefix: str = "axis") -> list:
    """The headline, then each axis varied alone around it (tag axis:<name>)."""
    cases = [headline]
    for name, values in axes.items():
        cases += [dataclasses.replace(headline, tags=(f"{tag_prefix}:{name}",), **{name: v}) for v in values]
    return dedupe(cases)


def cross(headline, overrides: dict) -> list:
    """The cross product of the given field values; fields not given keep the headline's (tag custom)."""
    names = [f.name for f in dataclasses.fields(headline)]
    for k in overrides:
        if k not in names or k == "tags":
            raise ValueError(f"case field {k!r}: expected one of {[n for n in names if n != 'tags']}")
    keys = list(overrides)
    cases = [dataclasses.replace(headline, tags=("custom",), **dict(zip(keys, combo)))
             for combo in itertools.product(*(overrides[k] for k in keys))]
    return dedupe(cases)


@dataclass
class BuildOptions:
    exact: bool = False  # a deterministic variant (no dropout) for the reference check
    compile_backend: str = "inductor"


@dataclass
class Impl:
    """One implementation built on one case's shared inputs.

    run(): one complete evaluation from a clean state, returning the named results the check compares with
    the reference `ref` (outputs, gradients, updated state). timers: metric -> factory returning (fn, setup)
    to time fn() with setup() before every call. inputs: tensors counted as inputs, not activations, by the
    saved-tensor count. cleanup(): drop what run() or the timers left (gradients, accumulators).
    """

    name: str
    ref: str
    run: Callable[[], dict]
    timers: dict
    inputs: list = field(default_factory=list)
    cleanup: Callable[[], None] = lambda: None
    notes: str = ""


def layer_impl(name: str, ref: str, forward: Callable, x: torch.Tensor, dy: torch.Tensor, grads: dict, *,
               module: torch.nn.Module | None = None, inputs=(), train: bool = True, infer: bool = True,
               post: Callable[[], dict] | None = None, reset: Callable[[], None] | None = None,
               notes: str = "") -> Impl:
    """An autograd layer y = forward(x) with backward dY. grads: result name -> leaf whose .grad it is
    ("dx": x, "da": A, ...). post(): work that belongs to the backward (e.g. projecting a gradient), run
    after it in the check and in the timed bwd and fwd_bwd; its dict joins the results. reset(): clears
    state beyond .grad before every repetition. module: switched to train()/eval() around the metrics."""
    leaves = list(grads.values())

    def clear():
        reset_grads(leaves)
        if reset is not None:
            reset()

    def mode(training: bool):
        if module is not None:
            module.train(training)

    def run() -> dict:
        clear()
        if not train:
            mode(False)
            with torch.no_grad():
                return {"y": forward(x)}
        mode(True)
        y = forward(x)
        y.backward(dy)
        out = {"y": y.detach(), **{k: t.grad for k, t in grads.items()}}
        if post is not None:
            out.update(post())
        return out

    def fwd():
        mode(True)
        return (lambda: forward(x)), clear

    def bwd():  # the forward runs in setup, untimed: a fresh graph per call (compiled graphs cannot retain theirs)
        mode(True)
        graph = {}

        def setup():
            clear()
            graph["y"] = forward(x)

        def fn():
            graph.pop("y").backward(dy)
            if post is not None:
                post()
        return fn, setup

    def fwd_bwd():
        mode(True)

        def fn():
            forward(x).backward(dy)
            if post is not None:
                post()
        return fn, clear

    def inference():
        mode(False)

        def fn():
            with torch.no_grad():
                forward(x)
        return fn, None

    timers = {}
    if train:
        timers.update(fwd=fwd, bwd=bwd, fwd_bwd=fwd_bwd)
    if infer:
        timers["infer"] = inference
    return Impl(name, ref, run, timers, [x, *inputs, *leaves], clear, notes)


def compiled(module: torch.nn.Module, opts: BuildOptions) -> Callable:
    """torch.compile of an eager module, static shapes. Dynamo's caches are reset first: cases build new
    modules of the same class, and past its recompile limit dynamo would silently run them eagerly."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(module, backend=opts.compile_backend, dynamic=False)


def backend_reasons(device: torch.device, *, has_cuda_kernels: bool = False, has_cublas: bool = False,
                    has_auto: bool = False) -> dict:
    """Each fastpeft backend -> None if it is timed on this device, else why not ("auto": the op's measured choice
    per shape, fastpeft/autotune.py)."""
    from fastpeft._backend import cublas_unavailable_reason, cuda_unavailable_reason, triton_unavailable_reason

    if device.type == "cuda":
        triton = triton_unavailable_reason(device)
        cublas = cublas_unavailable_reason(device)
    else:
        triton = cublas = "the Triton interpreter on the CPU is a test vehicle, not a speed figure"
    cuda = cuda_unavailable_reason(device) if has_cuda_kernels else "this op has no CUDA C++ kernels"
    if not has_cublas:
        cublas = "this op has no cuBLAS path"
    if not has_auto:
        auto = "this op does not measure its backends: auto is its static default, timed under that backend's name"
    elif device.type != "cuda":
        auto = "auto is the torch backend on the CPU (fastpeft[torch])"
    else:
        from fastpeft import autotune

        auto = None if autotune.enabled() else f"${autotune.ENV_ENABLE}=0: auto is the static default"
    return {"torch": None, "triton": triton, "cuda": cuda, "cublas": cublas, "auto": auto}


def is_fastpeft(name: str) -> bool:
    """Whether an implementation name is fastpeft[<backend>]."""
    return name.startswith("fastpeft[") and name.endswith("]")


def unknown_impl(name: str, families, has_cuda_kernels: bool = False, has_cublas: bool = False,
                 has_auto: bool = False) -> ValueError:
    """The error an op's build() raises for a name that is none of its implementations."""
    names = expand(families, ("torch", "triton", "cuda", "cublas", "auto"), has_cuda_kernels, has_cublas, has_auto)
    return ValueError(f"impl: expected one of {names}, got {name!r}")


def fastpeft_backend(name: str, device: torch.device, *, has_cuda_kernels: bool = False,
                     has_cublas: bool = False, has_auto: bool = False) -> str:
    """The backend of an impl named fastpeft[<backend>]; raises Unavailable when it cannot run here."""
    backend = name[len("fastpeft["):-1]
    reasons = backend_reasons(device, has_cuda_kernels=has_cuda_kernels, has_cublas=has_cublas, has_auto=has_auto)
    if backend not in reasons:
        raise ValueError(f"impl {name!r}: expected a backend among {list(reasons)}")
    if reasons[backend] is not None:
        raise Unavailable(reasons[backend])
    return backend


def main_impl(device: torch.device, op=None) -> str:
    """The fastpeft implementation a user gets by default on this device (the one the ratios headline): for an op
    that measures its backends (op.HAS_AUTO) on CUDA, fastpeft[auto]."""
    from fastpeft._backend import resolve_backend

    if op is not None and getattr(op, "HAS_AUTO", False) and backend_reasons(device, has_auto=True)["auto"] is None:
        return "fastpeft[auto]"
    return f"fastpeft[{resolve_backend(None, device)}]"


def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape, g: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=g.device) * scale).to(dtype)


def uniform(shape, g: torch.Generator, dtype: torch.dtype, bound: float) -> torch.Tensor:
    return ((torch.rand(shape, generator=g, device=g.device) * 2 - 1) * bound).to(dtype)


def f64(*tensors):
    return tuple(t.detach().to(torch.float64) for t in tensors)


__all__ = ["Unavailable", "CaseMixin", "dedupe", "around", "cross", "BuildOptions", "Impl", "layer_impl",
           "compiled", "backend_reasons", "is_fastpeft", "unknown_impl", "fastpeft_backend", "main_impl", "generator",
           "randn", "uniform", "f64", "COMPILED", "COMPILED_DESCRIPTION"]
