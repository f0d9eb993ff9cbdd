"""DoRA linear (PEFT's use_dora=True): fastpeft.LoRALinear(use_dora=True) against HF PEFT's DoRA layer.

y = x·W0ᵀ + b + (g − 1)⊙(dropout(x)·W0ᵀ) + g⊙s·(dropout(x)·Aᵀ)·Bᵀ, g = m/‖W0 + s·B·A‖ per output row (detached).
The issue's targets (H100/H200, bf16, M=8192, 4096x4096, r=16): a training step >= 2x faster than PEFT's DoRA,
and a lower peak memory.

Implementations, all on the same tensors (x, W0, A, B non-zero, m around ‖W0 + s·B·A‖, dY) of a case:
  floor            the frozen base nn.Linear alone: what DoRA would cost if it were free
  peft             HF PEFT's DoRA layer (get_peft_model with use_dora=True on a one-Linear model), when peft imports
  fastpeft[<b>]    fastpeft.LoRALinear(use_dora=True) with backend b (torch, triton)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import common
from .common import BuildOptions, Unavailable
from .lora import Case, _frozen_linear, _OneLinear, tiny  # noqa: F401  (tiny: the host-overhead twin, as LoRA's)

NAME = "dora"
FLOOR = "floor"
IMPLS = ("floor", "peft", "fastpeft")
DESCRIPTIONS = {
    "floor": "frozen nn.Linear alone (the floor)",
    "peft": "HF PEFT DoRA layer (LoraConfig(use_dora=True))",
    "fastpeft[torch]": "fastpeft.LoRALinear(use_dora=True), PyTorch backend",
    "fastpeft[triton]": "fastpeft.LoRALinear(use_dora=True), Triton kernels (column scale in the GEMM epilogue)",
}


def headline(preset: str) -> Case:
    if preset == "cpu":
        return Case(1024, 512, 512, 16, "fp32", 0.0, ("headline",))
    if preset == "smoke":
        return Case(7, 40, 24, 3, "fp32", 0.0, ("headline",))
    return Case(8192, 4096, 4096, 16, "bf16", 0.0, ("headline",))


def cases(preset: str) -> list[Case]:
    h = headline(preset)
    drop = dataclasses.replace(h, dropout=0.1, tags=("axis:dropout",))
    if preset in ("smoke", "quick"):
        return [h, drop]
    dec = dataclasses.replace(h, m=1, tags=("decode",))
    if preset == "cpu":
        return [h, drop, dataclasses.replace(dec, in_features=256, out_features=256)]
    return common.dedupe([h, drop, dec, *common.around(h, {"m": (16, 2048, 16384), "r": (8, 64)})[1:],
                          dataclasses.replace(h, in_features=4096, out_features=11008, tags=("axis:shape",))])


def needs_twin(case: Case) -> bool:
    return case.dropout > 0


def work(case: Case) -> dict:
    """Necessary FLOPs and bytes: each operand read once, each result written once. On top of LoRA's: the norm
    (A·W0ᵀ and A·Aᵀ, W0 read once), the magnitude's gradient (a read of dY⊙V), and with dropout PEFT's second base
    product dropout(x)·W0ᵀ forward and its transpose backward."""
    e, m, k, n, r = case.torch_dtype.itemsize, case.m, case.in_features, case.out_features, case.r
    gemm = 2.0 * m * k * n * (2 if case.dropout > 0 else 1)
    norm = 2.0 * r * k * n + 2.0 * r * r * k
    fwd = (gemm + 2.0 * m * r * (k + n) + norm, e * (m * k + n * k + r * k + n * r + m * n) + 4 * n)
    bwd = (gemm + 4.0 * m * r * (k + n) + 2.0 * m * n,
           e * (2 * m * n + n * k + 2 * m * k + 2 * (r * k + n * r) + m * r) + 8 * n)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1]), "infer": fwd}


def bytes_needed(case: Case) -> int:
    """A generous estimate of a case's peak: inputs, PEFT's [M, out] and [out, in] temporaries, the float64
    reference."""
    e = case.torch_dtype.itemsize
    md, w = case.m * max(case.in_features, case.out_features), case.in_features * case.out_features
    return e * (12 * md + 4 * w) + 8 * (6 * md + 3 * w)


@dataclass
class Inputs:
    """One case's tensors, shared by every implementation: fresh and random, never zeros."""

    case: Case
    x: torch.Tensor  # [M, in], requires grad
    weight: nn.Parameter  # W0 [out, in], frozen
    lora_a: nn.Parameter  # [r, in]
    lora_b: nn.Parameter  # [out, r], non-zero
    magnitude: nn.Parameter  # [out], ‖W0 + s·B·A‖ scaled by U(0.5, 1.5): g away from 1, so the scale counts
    dy: torch.Tensor  # [M, out]

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = common.generator(device, seed)
    dt, k, n, r = case.torch_dtype, case.in_features, case.out_features, case.r
    x = common.randn((case.m, k), g, dt).requires_grad_(True)
    w = nn.Parameter(common.uniform((n, k), g, dt, 1 / math.sqrt(k)), requires_grad=False)
    a = nn.Parameter(common.uniform((r, k), g, dt, 1 / math.sqrt(k)))
    b = nn.Parameter(common.randn((n, r), g, dt, 1 / math.sqrt(r)))
    with torch.no_grad():
        norm = torch.linalg.norm(w.double() + case.scaling * b.double() @ a.double(), dim=1)
        scale = torch.rand(n, generator=g, device=g.device, dtype=torch.float64) + 0.5
    mag = nn.Parameter((norm * scale).to(dt))
    return Inputs(case, x, w, a, b, mag, common.randn((case.m, n), g, dt))


def reference(inp: Inputs, kind: str) -> dict:
    """y, dX (and dA, dB, dm for kind "dora", without dropout) in float64 from the case's tensors."""
    x, w, dy = common.f64(inp.x, inp.weight, inp.dy)
    if kind != "dora":
        return {"y": x @ w.t(), "dx": dy @ w}
    a, b, m = (t.detach().double().requires_grad_(True) for t in (inp.lora_a, inp.lora_b, inp.magnitude))
    x = x.requires_grad_(True)
    s = inp.case.scaling
    g = m / torch.linalg.norm(w + s * b.detach() @ a.detach(), dim=1)
    y = g * (x @ w.t() + s * (x @ a.t()) @ b.t())
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "da": a.grad, "db": b.grad, "dm": m.grad}


def _peft_layer(inp: Inputs, p: float):
    try:
        import inspect

        from peft import LoraConfig, get_peft_model
    except Exception as exc:  # not installed, or an install that does not import
        raise Unavailable(f"peft does not import ({type(exc).__name__}: {exc})") from None
    c = inp.case
    cfg = LoraConfig(r=c.r, lora_alpha=c.scaling * c.r, lora_dropout=p, target_modules=["proj"], bias="none",
                     use_dora=True)
    kw = {}
    if "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters:
        kw["autocast_adapter_dtype"] = False  # keep the case's dtype, as every implementation does
    layer = get_peft_model(_OneLinear(_frozen_linear(inp)), cfg, **kw).base_model.model.proj
    la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    lm = layer.lora_magnitude_vector["default"].weight
    la.data, lb.data = inp.lora_a.detach().clone(), inp.lora_b.detach().clone()
    lm.data = inp.magnitude.detach().clone()
    if abs(layer.scaling["default"] - c.scaling) > 1e-12:
        raise RuntimeError(f"peft scaling {layer.scaling['default']} != {c.scaling}")
    return layer, la, lb, lm


def _fastpeft_layer(inp: Inputs, p: float, backend: str):
    import fastpeft

    c = inp.case
    layer = fastpeft.LoRALinear(_frozen_linear(inp), r=c.r, alpha=c.scaling * c.r, dropout=p, backend=backend,
                                use_dora=True)
    layer.lora_A.data = inp.lora_a.detach().clone()
    layer.lora_B.data = inp.lora_b.detach().clone()
    layer.lora_magnitude_vector.data = inp.magnitude.detach().clone()
    return layer, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector


def build(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    """An implementation on the case's shared tensors; raises Unavailable with the reason."""
    p = 0.0 if opts.exact else inp.case.dropout
    notes = ""
    if name == "floor":
        mod = _frozen_linear(inp)
        return common.layer_impl(name, "base", mod, inp.x, inp.dy, {"dx": inp.x}, module=mod, inputs=[inp.weight])
    if name == "peft":
        mod, a, b, m = _peft_layer(inp, p)
        notes = "autocast_adapter_dtype=False"
    elif common.is_fastpeft(name):
        mod, a, b, m = _fastpeft_layer(inp, p, common.fastpeft_backend(name, inp.device))
    else:
        raise common.unknown_impl(name, IMPLS)
    return common.layer_impl(name, "dora", mod, inp.x, inp.dy, {"dx": inp.x, "da": a, "db": b, "dm": m}, module=mod,
                             inputs=[inp.weight, a, b, m], notes=notes)


__all__ = ["NAME", "FLOOR", "IMPLS", "DESCRIPTIONS", "Case", "Inputs", "headline", "cases", "make_inputs",
           "reference", "build", "work", "needs_twin", "tiny", "bytes_needed"]
