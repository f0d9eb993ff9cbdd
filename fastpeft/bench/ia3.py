"""IA3 on a frozen linear: (x·Wᵀ + b)⊙l (mode "output") or (x⊙l)·Wᵀ + b (mode "input"), fastpeft's
fused GEMM against the plain frozen linear and eager PyTorch. The issue's target: IA3 adds <= 3% to the
frozen linear's time.

Implementations, all on the same x, W (frozen), b, l (random around 1) and dY of a case:
  floor            the frozen F.linear alone (cuBLAS): what IA3 would cost if it were free
  eager            F.linear(x, W, b) * l, or F.linear(x * l, W, b)
  compiled         torch.compile of eager
  fastpeft[<b>]    fastpeft.ia3_linear with backend b (torch, triton, cublas)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import common
from .common import BuildOptions

NAME = "ia3"
FLOOR = "floor"
HAS_CUBLAS = True
HAS_AUTO = True  # backend="auto" measures the backends per shape bucket on CUDA
IMPLS = ("floor", "eager", common.COMPILED, "fastpeft")
DESCRIPTIONS = {
    "floor": "frozen F.linear alone (the floor)",
    "eager": "eager PyTorch: F.linear(x, W, b) * l, or F.linear(x * l, W, b)",
    common.COMPILED: common.COMPILED_DESCRIPTION,
    "fastpeft[torch]": "fastpeft.ia3_linear, PyTorch backend",
    "fastpeft[triton]": "fastpeft.ia3_linear, scale fused into the Triton GEMM",
    "fastpeft[cublas]": "fastpeft.ia3_linear, cuBLAS GEMMs, the scale in one Triton pass on W or the activations",
    "fastpeft[auto]": "fastpeft.ia3_linear, backend='auto': each pass on the backend it measured fastest here",
}


@dataclass(frozen=True)
class Case(common.CaseMixin):
    m: int
    in_features: int
    out_features: int
    mode: str = "output"
    dtype: str = "bf16"
    tags: tuple = field(default=(), compare=False)

    @property
    def label(self) -> str:
        return f"M={self.m} {self.in_features}x{self.out_features} {self.mode} {self.dtype}"


def headline(preset: str) -> Case:
    if preset == "cpu":
        return Case(256, 512, 512, "output", "fp32", ("headline",))
    if preset == "smoke":
        return Case(7, 40, 24, "output", "fp32", ("headline",))
    return Case(8192, 4096, 4096, "output", "bf16", ("headline",))


def cases(preset: str) -> list[Case]:
    h = headline(preset)
    inp = dataclasses.replace(h, mode="input", tags=("headline",))
    dec = dataclasses.replace(h, m=1, tags=("decode", "headline"))
    if preset in ("smoke", "cpu", "quick"):
        return [h, inp, dec]
    grid = [dataclasses.replace(h, m=m, in_features=i, out_features=o, mode=md, tags=("grid",))
            for m in (1, 2048, 16384) for i, o in ((4096, 4096), (4096, 11008)) for md in ("output", "input")]
    return common.dedupe([h, inp, dec, *grid])


def tiny(case: Case) -> Case:
    """The case at tiny sizes (M=1, 16x16): its time per call is host overhead."""
    return dataclasses.replace(case, m=1, in_features=16, out_features=16, tags=())


def work(case: Case) -> dict:
    """Necessary FLOPs and bytes: forward the GEMM plus the scale; backward dX = (dY⊙l)·W (or ⊙l after)
    and dl, a reduction over rows of the base output (mode output) or of x⊙(dY·W) (mode input)."""
    e, m, k, n = case.torch_dtype.itemsize, case.m, case.in_features, case.out_features
    ln = n if case.mode == "output" else k
    fwd = (2.0 * m * k * n + m * ln, e * (m * k + n * k + m * n + n + ln))
    bwd = (2.0 * m * k * n + 2.0 * m * ln, e * (m * n + n * k + m * k + m * ln + 2 * ln))
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1]), "infer": fwd}


def bytes_needed(case: Case) -> int:
    md, w = case.m * max(case.in_features, case.out_features), case.in_features * case.out_features
    return case.torch_dtype.itemsize * (8 * md + w) + 8 * (5 * md + w)


@dataclass
class Inputs:
    case: Case
    x: torch.Tensor  # [M, in], requires grad
    weight: torch.Tensor  # [out, in], frozen
    bias: torch.Tensor  # [out], frozen, non-zero
    scale: torch.Tensor  # [out] or [in], trainable, random around 1
    dy: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = common.generator(device, seed)
    dt, k, n = case.torch_dtype, case.in_features, case.out_features
    ln = n if case.mode == "output" else k
    x = common.randn((case.m, k), g, dt).requires_grad_(True)
    w = common.uniform((n, k), g, dt, 1 / math.sqrt(k))
    scale = (1 + common.randn((ln,), g, torch.float32, 0.3)).to(dt).requires_grad_(True)
    return Inputs(case, x, w, common.randn((n,), g, dt, 0.5), scale, common.randn((case.m, n), g, dt))


def _eager(x, w, b, scale, mode):
    return F.linear(x, w, b) * scale if mode == "output" else F.linear(x * scale, w, b)


def reference(inp: Inputs, kind: str) -> dict:
    """y, dX (and dl for kind "ia3") by float64 autograd of the formula."""
    x, s = (t.detach().to(torch.float64).requires_grad_(True) for t in (inp.x, inp.scale))
    w, b = common.f64(inp.weight, inp.bias)
    y = F.linear(x, w, b) if kind == "base" else _eager(x, w, b, s, inp.case.mode)
    y.backward(inp.dy.to(torch.float64))
    out = {"y": y.detach(), "dx": x.grad}
    if kind == "ia3":
        out["dl"] = s.grad
    return out


class EagerIA3(torch.nn.Module):
    def __init__(self, inp: Inputs):
        super().__init__()
        self.inp = inp

    def forward(self, x):
        i = self.inp
        return _eager(x, i.weight, i.bias, i.scale, i.case.mode)


def build(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    if name == "floor":
        return common.layer_impl(name, "base", lambda x: F.linear(x, inp.weight, inp.bias), inp.x, inp.dy,
                                 {"dx": inp.x}, inputs=[inp.weight, inp.bias])
    if name in ("eager", common.COMPILED):
        mod = EagerIA3(inp)
        fwd = mod if name == "eager" else common.compiled(mod, opts)
    elif common.is_fastpeft(name):
        import fastpeft

        backend = common.fastpeft_backend(name, inp.device, has_cublas=HAS_CUBLAS, has_auto=HAS_AUTO)

        def fwd(x):
            return fastpeft.ia3_linear(x, inp.weight, inp.bias, inp.scale, inp.case.mode, backend=backend)
    else:
        raise common.unknown_impl(name, IMPLS, has_cublas=HAS_CUBLAS, has_auto=HAS_AUTO)
    return common.layer_impl(name, "ia3", fwd, inp.x, inp.dy, {"dx": inp.x, "dl": inp.scale},
                             inputs=[inp.weight, inp.bias])


__all__ = ["NAME", "FLOOR", "IMPLS", "DESCRIPTIONS", "Case", "Inputs", "headline", "cases", "make_inputs", "reference",
           "build", "work", "tiny", "bytes_needed", "HAS_CUBLAS"]
