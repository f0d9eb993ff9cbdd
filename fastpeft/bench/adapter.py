"""Bottleneck adapter: y = h + s·(act(h·Wdᵀ + bd)·Wuᵀ + bu), fastpeft's fused kernel against eager PyTorch.

Implementations, all on the same h, weights (biases and up-projection non-zero) and dY of a case:
  eager            the naive PyTorch adapter: h + s * F.linear(F.gelu(F.linear(h, Wd, bd)), Wu, bu)
  compiled         torch.compile of eager
  fastpeft[<b>]    fastpeft.bottleneck_adapter with backend b (torch, triton)
There is no floor: the adapter is a whole op, and its figure of merit is the fraction of the copy
bandwidth it reaches (the issue's target: >= 75% at M=16384, d=4096, a=64, and >= 2.5x eager).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import common
from .common import BuildOptions

NAME = "adapter"
IMPLS = ("eager", common.COMPILED, "fastpeft")
ACTIVATION = "gelu"  # erf GELU, as F.gelu
DESCRIPTIONS = {
    "eager": "naive PyTorch: h + s*F.linear(gelu(F.linear(h, Wd, bd)), Wu, bu)",
    common.COMPILED: common.COMPILED_DESCRIPTION,
    "fastpeft[torch]": "fastpeft.bottleneck_adapter, PyTorch backend",
    "fastpeft[triton]": "fastpeft.bottleneck_adapter, fused Triton kernel",
}


@dataclass(frozen=True)
class Case(common.CaseMixin):
    m: int
    d: int
    a: int
    dtype: str = "bf16"
    tags: tuple = field(default=(), compare=False)

    @property
    def label(self) -> str:
        return f"M={self.m} d={self.d} a={self.a} {self.dtype}"

    scaling = 0.5  # not 1, so that a dropped scaling shows


def headline(preset: str) -> Case:
    if preset == "cpu":
        return Case(1024, 512, 64, "fp32", ("headline",))
    if preset == "smoke":
        return Case(7, 40, 6, "fp32", ("headline",))
    return Case(16384, 4096, 64, "bf16", ("headline",))


def cases(preset: str) -> list[Case]:
    h = headline(preset)
    dec = dataclasses.replace(h, m=1, tags=("decode", "headline"))
    if preset in ("smoke", "cpu", "quick"):
        return [h, dec]
    return common.dedupe([h, dec, *common.around(h, {"m": (1, 2048, 16384), "d": (768, 4096, 8192),
                                                     "a": (16, 64, 256)})[1:]])


def tiny(case: Case) -> Case:
    """The case at tiny sizes (M=1, d=16, a=4): its time per call is host overhead."""
    return dataclasses.replace(case, m=1, d=16, a=4, tags=())


def work(case: Case) -> dict:
    """Necessary FLOPs and bytes: h and dY read once, y and dh written once, the weights read once and their
    gradients written once; the [M, a] activation written in forward and read in backward."""
    e, m, d, a = case.torch_dtype.itemsize, case.m, case.d, case.a
    w = e * (2 * d * a + a + d)
    fwd = (4.0 * m * d * a, e * 2 * m * d + w)
    train_fwd = (fwd[0], fwd[1] + e * m * a)
    bwd = (8.0 * m * d * a, e * (3 * m * d + m * a) + 2 * w)
    return {"fwd": train_fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], train_fwd[1] + bwd[1]), "infer": fwd}


def bytes_needed(case: Case) -> int:
    return case.torch_dtype.itemsize * 8 * case.m * (case.d + case.a) + 8 * 6 * case.m * (case.d + case.a)


@dataclass
class Inputs:
    case: Case
    h: torch.Tensor  # [M, d], requires grad
    down_w: torch.Tensor  # [a, d]
    down_b: torch.Tensor  # [a]
    up_w: torch.Tensor  # [d, a], non-zero (trained adapters are)
    up_b: torch.Tensor  # [d]
    dy: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.h.device

    @property
    def params(self) -> dict:
        return {"d_down_w": self.down_w, "d_down_b": self.down_b, "d_up_w": self.up_w, "d_up_b": self.up_b}


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = common.generator(device, seed)
    dt, d, a = case.torch_dtype, case.d, case.a

    def leaf(shape, scale):
        return common.randn(shape, g, dt, scale).requires_grad_(True)

    return Inputs(case, leaf((case.m, d), 1.0), leaf((a, d), 1 / math.sqrt(d)), leaf((a,), 0.5),
                  leaf((d, a), 1 / math.sqrt(a)), leaf((d,), 0.5), common.randn((case.m, d), g, dt))


def _eager(h, wd, bd, wu, bu, s):
    return h + s * F.linear(F.gelu(F.linear(h, wd, bd)), wu, bu)


def reference(inp: Inputs, kind: str) -> dict:
    """y and every gradient by float64 autograd of the formula."""
    h, wd, bd, wu, bu = (t.detach().to(torch.float64).requires_grad_(True)
                         for t in (inp.h, inp.down_w, inp.down_b, inp.up_w, inp.up_b))
    y = _eager(h, wd, bd, wu, bu, inp.case.scaling)
    y.backward(inp.dy.to(torch.float64))
    return {"y": y.detach(), "dh": h.grad, "d_down_w": wd.grad, "d_down_b": bd.grad, "d_up_w": wu.grad,
            "d_up_b": bu.grad}


class EagerAdapter(torch.nn.Module):
    def __init__(self, inp: Inputs):
        super().__init__()
        self.inp = inp

    def forward(self, h):
        i = self.inp
        return _eager(h, i.down_w, i.down_b, i.up_w, i.up_b, i.case.scaling)


def build(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    if name in ("eager", common.COMPILED):
        mod = EagerAdapter(inp)
        fwd = mod if name == "eager" else common.compiled(mod, opts)
    elif common.is_fastpeft(name):
        import fastpeft

        backend = common.fastpeft_backend(name, inp.device)
        s = inp.case.scaling

        def fwd(h):
            return fastpeft.bottleneck_adapter(h, inp.down_w, inp.down_b, inp.up_w, inp.up_b, s, ACTIVATION,
                                               backend=backend)
    else:
        raise common.unknown_impl(name, IMPLS)
    return common.layer_impl(name, "adapter", fwd, inp.h, inp.dy, {"dh": inp.h, **inp.params})


__all__ = ["NAME", "IMPLS", "DESCRIPTIONS", "Case", "Inputs", "headline", "cases", "make_inputs", "reference", "build",
           "work", "tiny", "bytes_needed"]
