"""LoRA linear: y = x·W0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, fastpeft.LoRALinear against what users would run instead.

Implementations, all on the same tensors (x, W0, A, B non-zero, dY) of a case:
  floor            the frozen base nn.Linear alone: what LoRA would cost if it were free
  eager            LoRA as HF PEFT writes it, in eager PyTorch: base(x) + B(A(dropout(x)))·s
  peft             HF PEFT's own LoraLayer (get_peft_model on a one-Linear model), when peft imports
  addmm            the cuBLAS-addmm recipe of unsloth-style libraries: out = x@W0ᵀ; out.addmm_(x@Aᵀ, Bᵀ, alpha=s),
                   its own autograd.Function saving x and x@Aᵀ
  compiled         torch.compile of eager
  fastpeft[<b>]    fastpeft.LoRALinear with backend b where it runs (torch, triton; cuda on request)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import common
from .common import BuildOptions, Unavailable

NAME = "lora"
FLOOR = "floor"
HAS_CUDA_KERNELS = True
HAS_CUBLAS = True
HAS_AUTO = True  # backend="auto" measures the backends per shape bucket on CUDA (fastpeft/ops/lora_linear_auto.py)
IMPLS = ("floor", "eager", "peft", "addmm", common.COMPILED, "fastpeft")
DESCRIPTIONS = {
    "floor": "frozen nn.Linear alone (the floor)",
    "eager": "eager PEFT-style: base(x) + B(A(dropout(x)))*s",
    "peft": "HF PEFT LoraLayer",
    "addmm": "cuBLAS addmm recipe (unsloth-style autograd.Function)",
    common.COMPILED: common.COMPILED_DESCRIPTION,
    "fastpeft[torch]": "fastpeft.LoRALinear, PyTorch backend",
    "fastpeft[triton]": "fastpeft.LoRALinear, Triton kernels",
    "fastpeft[cuda]": "fastpeft.LoRALinear, CUDA C++ kernels around cuBLAS",
    "fastpeft[cublas]": "fastpeft.LoRALinear, cuBLAS addmm with the low-rank term as C (Triton skinny kernels)",
    "fastpeft[auto]": "fastpeft.LoRALinear, backend='auto': each pass on the backend it measured fastest here",
}


@dataclass(frozen=True)
class Case(common.CaseMixin):
    m: int
    in_features: int
    out_features: int
    r: int
    dtype: str = "bf16"
    dropout: float = 0.0
    tags: tuple = field(default=(), compare=False)

    @property
    def label(self) -> str:
        return f"M={self.m} {self.in_features}x{self.out_features} r={self.r} {self.dtype} p={self.dropout:g}"

    @property
    def scaling(self) -> float:
        return 2.0  # alpha = 2r: a LoRA term as large as the base term, so that a wrong one shows


# The full cross product of the axes (6 M x 4 widths x 4 ranks x 2 dropouts) would take ~6 minutes per
# implementation on an H100; the full grid varies one axis at a time around the headline, plus decode cases.
_WIDTHS = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))


def headline(preset: str) -> Case:
    if preset == "cpu":  # the shape of issue 14's measurements
        return Case(2048, 1024, 1024, 16, "fp32", 0.1, ("headline",))
    if preset == "smoke":
        return Case(7, 40, 24, 3, "fp32", 0.1, ("headline",))
    return Case(8192, 4096, 4096, 16, "bf16", 0.1, ("headline",))


def cases(preset: str) -> list[Case]:
    h = headline(preset)
    dec = dataclasses.replace(h, m=1, dropout=0.0, tags=("decode", "headline"))
    if preset == "smoke":
        return [h, dataclasses.replace(h, m=1, dropout=0.0, tags=("decode",))]
    if preset == "cpu":  # decode at 256x256 as in issue 14: where a call's host overhead shows
        return [h, dataclasses.replace(h, dropout=0.0, tags=("axis:dropout",)),
                dataclasses.replace(dec, in_features=256, out_features=256)]
    if preset == "quick":
        return [h, dec, dataclasses.replace(dec, m=16, tags=("decode",)),
                dataclasses.replace(h, in_features=4096, out_features=11008, tags=("axis:shape",))]
    widths = [dataclasses.replace(h, in_features=i, out_features=o, tags=("axis:shape",)) for i, o in _WIDTHS]
    decode = [dataclasses.replace(dec, m=m, in_features=i, out_features=o, tags=("decode",))
              for m in (1, 16) for i, o in _WIDTHS]
    return common.dedupe([h, dec, *common.around(h, {"m": (1, 16, 128, 2048, 8192, 16384), "r": (8, 16, 64, 128),
                                                     "dropout": (0.0, 0.1)})[1:], *widths, *decode])


def tiny(case: Case) -> Case:
    """The case at tiny sizes (M=1, 16x16, r=4): its time per call is host overhead."""
    return dataclasses.replace(case, m=1, in_features=16, out_features=16, r=4, tags=())


def needs_twin(case: Case) -> bool:
    return case.dropout > 0


def work(case: Case) -> dict:
    """Necessary FLOPs and bytes: each operand read once, each result written once."""
    e, m, k, n, r = case.torch_dtype.itemsize, case.m, case.in_features, case.out_features, case.r
    fwd = (2.0 * m * k * n + 2.0 * m * r * (k + n), e * (m * k + n * k + r * k + n * r + m * n))
    bwd = (2.0 * m * n * k + 4.0 * m * r * (k + n), e * (m * n + n * k + 2 * m * k + 2 * (r * k + n * r) + m * r))
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1]), "infer": fwd}


def bytes_needed(case: Case) -> int:
    """A generous estimate of a case's peak: inputs, the eager baselines' [M, d] temporaries, the float64 reference."""
    e = case.torch_dtype.itemsize
    md, w = case.m * max(case.in_features, case.out_features), case.in_features * case.out_features
    return e * (10 * md + w) + 8 * (5 * md + w)


@dataclass
class Inputs:
    """One case's tensors, shared by every implementation: fresh and random, never zeros."""

    case: Case
    x: torch.Tensor  # [M, in], requires grad (a layer inside a network gets dX asked of it)
    weight: nn.Parameter  # W0 [out, in], frozen
    lora_a: nn.Parameter  # [r, in]
    lora_b: nn.Parameter  # [out, r], non-zero so that the LoRA term is checked
    dy: torch.Tensor  # [M, out]

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = common.generator(device, seed)
    dt, k, n, r = case.torch_dtype, case.in_features, case.out_features, case.r
    x = common.randn((case.m, k), g, dt).requires_grad_(True)
    w = nn.Parameter(common.uniform((n, k), g, dt, 1 / math.sqrt(k)), requires_grad=False)  # nn.Linear's init
    a = nn.Parameter(common.uniform((r, k), g, dt, 1 / math.sqrt(k)))  # PEFT's kaiming-uniform bound
    b = nn.Parameter(common.randn((n, r), g, dt, 1 / math.sqrt(r)))
    return Inputs(case, x, w, a, b, common.randn((case.m, n), g, dt))


def reference(inp: Inputs, kind: str) -> dict:
    """y, dX (and dA, dB for kind "lora") in float64 from the case's tensors."""
    x, w, dy = common.f64(inp.x, inp.weight, inp.dy)
    y, dx = x @ w.t(), dy @ w
    out = {"y": y, "dx": dx}
    if kind == "lora":
        a, b = common.f64(inp.lora_a, inp.lora_b)
        s = inp.case.scaling
        xa, ds = x @ a.t(), dy @ b
        y.add_(xa @ b.t(), alpha=s)
        dx.add_(ds @ a, alpha=s)
        out.update(da=(ds.t() @ x).mul_(s), db=(dy.t() @ xa).mul_(s))
    return out


def _frozen_linear(inp: Inputs) -> nn.Linear:
    lin = nn.Linear(inp.case.in_features, inp.case.out_features, bias=False, device="meta")
    lin.weight = inp.weight  # the shared W0, no copy
    return lin


class EagerLoRA(nn.Module):
    """LoRA exactly as HF PEFT's Linear.forward computes it, with plain nn modules."""

    def __init__(self, inp: Inputs, p: float):
        super().__init__()
        c = inp.case
        self.base_layer = _frozen_linear(inp)
        self.lora_A = nn.Linear(c.in_features, c.r, bias=False, device="meta")
        self.lora_A.weight = inp.lora_a
        self.lora_B = nn.Linear(c.r, c.out_features, bias=False, device="meta")
        self.lora_B.weight = inp.lora_b
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scaling = c.scaling

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class AddmmLoRAFunction(torch.autograd.Function):
    """The cuBLAS-addmm recipe: two GEMMs plus rank-r addmm's, saving x (or dropout(x)) and x@Aᵀ."""

    @staticmethod
    def forward(ctx, x, xd, weight, lora_a, lora_b, scaling):
        src = x if xd is None else xd
        out = x @ weight.t()
        xa = src @ lora_a.t()
        out.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(src, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.separate = scaling, xd is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        src, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_xd, _, need_a, need_b, _ = ctx.needs_input_grad
        dx = dxd = da = db = None
        ds = dy @ lora_b  # [M, r], unscaled; s folded into the rank-r products below
        if need_x:
            dx = dy @ weight
            if not ctx.separate:
                dx.addmm_(ds, lora_a, alpha=s)
        if ctx.separate and need_xd:
            dxd = torch.mm(ds, lora_a).mul_(s)
        if need_a:
            da = torch.mm(ds.t(), src).mul_(s)
        if need_b:
            db = torch.mm(dy.t(), xa).mul_(s)
        return dx, dxd, None, da, db, None


class AddmmLoRA(nn.Module):
    def __init__(self, inp: Inputs, p: float):
        super().__init__()
        self.weight, self.lora_a, self.lora_b = inp.weight, inp.lora_a, inp.lora_b
        self.p, self.scaling = p, inp.case.scaling

    def forward(self, x):
        xd = nn.functional.dropout(x, self.p, True) if (self.p > 0 and self.training) else None
        return AddmmLoRAFunction.apply(x, xd, self.weight, self.lora_a, self.lora_b, self.scaling)


class _OneLinear(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def _peft_layer(inp: Inputs, p: float):
    try:
        import inspect

        from peft import LoraConfig, get_peft_model
    except Exception as exc:  # not installed, or an install that does not import
        raise Unavailable(f"peft does not import ({type(exc).__name__}: {exc})") from None
    c = inp.case
    cfg = LoraConfig(r=c.r, lora_alpha=c.scaling * c.r, lora_dropout=p, target_modules=["proj"], bias="none")
    kw = {}
    if "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters:
        # PEFT upcasts bf16/fp16 adapters to fp32 by default; keep the case's dtype, as every implementation does
        kw["autocast_adapter_dtype"] = False
    layer = get_peft_model(_OneLinear(_frozen_linear(inp)), cfg, **kw).base_model.model.proj
    la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    la.data, lb.data = inp.lora_a.detach().clone(), inp.lora_b.detach().clone()
    if abs(layer.scaling["default"] - c.scaling) > 1e-12:
        raise RuntimeError(f"peft scaling {layer.scaling['default']} != {c.scaling}")
    return layer, la, lb


def _fastpeft_layer(inp: Inputs, p: float, backend: str):
    import fastpeft

    c = inp.case
    layer = fastpeft.LoRALinear(_frozen_linear(inp), r=c.r, alpha=c.scaling * c.r, dropout=p, backend=backend)
    layer.lora_A.data = inp.lora_a.detach().clone().to(layer.lora_A.dtype)
    layer.lora_B.data = inp.lora_b.detach().clone().to(layer.lora_B.dtype)
    if abs(float(layer.scaling) - c.scaling) > 1e-12:
        raise RuntimeError(f"fastpeft scaling {layer.scaling} != {c.scaling}")
    return layer, layer.lora_A, layer.lora_B


def build(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    """An implementation on the case's shared tensors; raises Unavailable with the reason."""
    p = 0.0 if opts.exact else inp.case.dropout
    notes = ""
    if name == "floor":
        mod = _frozen_linear(inp)
        return common.layer_impl(name, "base", mod, inp.x, inp.dy, {"dx": inp.x}, module=mod, inputs=[inp.weight])
    if name in ("eager", common.COMPILED):
        mod, a, b = EagerLoRA(inp, p), inp.lora_a, inp.lora_b
        fwd = mod if name == "eager" else common.compiled(mod, opts)
    elif name == "addmm":
        mod, a, b = AddmmLoRA(inp, p), inp.lora_a, inp.lora_b
        fwd = mod
    elif name == "peft":
        mod, a, b = _peft_layer(inp, p)
        fwd, notes = mod, "autocast_adapter_dtype=False"
    elif common.is_fastpeft(name):
        backend = common.fastpeft_backend(name, inp.device, has_cuda_kernels=HAS_CUDA_KERNELS, has_cublas=HAS_CUBLAS,
                                          has_auto=HAS_AUTO)
        mod, a, b = _fastpeft_layer(inp, p, backend)
        fwd = mod
    else:
        raise common.unknown_impl(name, IMPLS, HAS_CUDA_KERNELS, HAS_CUBLAS, HAS_AUTO)
    return common.layer_impl(name, "lora", fwd, inp.x, inp.dy, {"dx": inp.x, "da": a, "db": b}, module=mod,
                             inputs=[inp.weight, a, b], notes=notes)


__all__ = ["NAME", "FLOOR", "HAS_CUDA_KERNELS", "HAS_CUBLAS", "HAS_AUTO", "IMPLS", "DESCRIPTIONS", "Case", "Inputs", "headline", "cases",
           "make_inputs", "reference", "build", "work", "needs_twin", "tiny", "bytes_needed", "EagerLoRA", "AddmmLoRAFunction"]
