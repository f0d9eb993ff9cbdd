"""QLoRA linear: LoRA over a bitsandbytes 4-bit (NF4 / FP4) frozen base, fastpeft.LoRALinear over Linear4bit
(fastpeft.qlora_linear: W0 stays packed) against PEFT + bitsandbytes.

y = x·deq(W0)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, W0 quantized by bitsandbytes (blockwise absmax, optionally double quantized).

Implementations, all on the same tensors (x, the packed W0 and its QuantState, A, B non-zero, dY) of a case:
  floor            the 16-bit frozen nn.Linear holding deq(W0) (in the case's dtype): what QLoRA is measured
                   against, a base that needs no dequantization and no adapter
  peft             HF PEFT's lora.bnb.Linear4bit over bitsandbytes' Linear4bit, when both import
  fastpeft[<b>]    fastpeft.LoRALinear over the same Linear4bit (a QLoRALinear) with backend b (torch, triton)
When bitsandbytes does not import, every implementation is skipped with that reason.

The reference: float64 from deq(W0) rounded to the case's dtype (fastpeft's dequantize, bit for bit bitsandbytes'
on every shape; bitsandbytes 0.50's own CPU kernel is wrong where an even in_features is not a multiple of the
blocksize: the cpu and smoke presets keep in_features odd or a multiple of 64, so PEFT's figures are right too).
W0 is quantized from a weight in the case's dtype, so forward (deq straight to x's dtype) and backward (deq
through the dtype W0 was quantized from) use the same deq(W0).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import common
from .common import BuildOptions, Unavailable
from .lora import _frozen_linear, _OneLinear  # the floor shares deq(W0), no copy
from .lora import reference as lora_reference

NAME = "qlora"
FLOOR = "floor"
IMPLS = ("floor", "peft", "fastpeft")
DESCRIPTIONS = {
    "floor": "16-bit frozen nn.Linear with the dequantized W0 alone (the floor)",
    "peft": "HF PEFT lora.bnb.Linear4bit over bitsandbytes Linear4bit",
    "fastpeft[torch]": "fastpeft.LoRALinear over Linear4bit (QLoRALinear), PyTorch backend (row-block dequant)",
    "fastpeft[triton]": "fastpeft.LoRALinear over Linear4bit (QLoRALinear), Triton kernels (dequant in the GEMM)",
}


@dataclass(frozen=True)
class Case(common.CaseMixin):
    m: int
    in_features: int
    out_features: int
    r: int
    dtype: str = "bf16"
    dropout: float = 0.0
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    tags: tuple = field(default=(), compare=False)

    @property
    def label(self) -> str:
        return (f"M={self.m} {self.in_features}x{self.out_features} r={self.r} {self.dtype} p={self.dropout:g} "
                f"{self.quant_type} bs{self.blocksize}{' dq' if self.double_quant else ''}")

    @property
    def scaling(self) -> float:
        return 2.0  # alpha = 2r: a LoRA term as large as the base term, so that a wrong one shows


def headline(preset: str) -> Case:
    if preset == "cpu":  # in_features odd: bitsandbytes' CPU dequantize is right there (PEFT's figures)
        return Case(1024, 1023, 512, 16, "fp32", 0.1, tags=("headline",))
    if preset == "smoke":
        return Case(7, 53, 24, 3, "fp32", 0.1, tags=("headline",))
    return Case(8192, 4096, 4096, 16, "bf16", 0.1, tags=("headline",))


def cases(preset: str) -> list[Case]:
    h = headline(preset)
    dec = dataclasses.replace(h, m=1, dropout=0.0, tags=("decode",))
    if preset == "quick":  # the headline alone: with decode the quick presets of all ops outgrow gpu_session.sh's
        return [h]         # budget (tests/test_bench.py); decode is in the full preset
    if preset == "smoke":
        return [h, dec]
    if preset == "cpu":  # decode with in_features a multiple of the blocksize (the other shape bitsandbytes gets right)
        return [h, dataclasses.replace(h, dropout=0.0, tags=("axis:dropout",)),
                dataclasses.replace(dec, in_features=256, out_features=255)]
    return common.dedupe([h, dec, dataclasses.replace(dec, m=16), *common.around(h, {
        "m": (2048, 16384), "r": (8, 64), "dropout": (0.0,), "blocksize": (128,), "double_quant": (False,),
        "quant_type": ("fp4",)})[1:], dataclasses.replace(h, in_features=4096, out_features=11008, tags=("axis:shape",)),
        dataclasses.replace(h, in_features=11008, out_features=4096, tags=("axis:shape",))])


def tiny(case: Case) -> Case:
    """The case at tiny sizes (M=1, 64x16, r=4: in_features one 64-block): its time per call is host overhead."""
    return dataclasses.replace(case, m=1, in_features=64, out_features=16, r=4, tags=())


def needs_twin(case: Case) -> bool:
    return case.dropout > 0


def w0_bytes(case: Case) -> float:
    """The packed W0: 4 bits a weight, plus its block scales (uint8 codes and an fp32 scale per 256 of them
    with double quantization, fp32 without)."""
    n, k = case.out_features, case.in_features
    blocks = -(-n * k // case.blocksize)
    scales = blocks + 4 * -(-blocks // 256) if case.double_quant else 4 * blocks
    return n * k / 2 + scales


def work(case: Case) -> dict:
    """Necessary FLOPs (LoRA's) and bytes: each operand read once, each result written once, W0 at 4 bits."""
    e, m, k, n, r = case.torch_dtype.itemsize, case.m, case.in_features, case.out_features, case.r
    w = w0_bytes(case)
    fwd = (2.0 * m * k * n + 2.0 * m * r * (k + n), w + e * (m * k + r * k + n * r + m * n))
    bwd = (2.0 * m * n * k + 4.0 * m * r * (k + n), w + e * (m * n + 2 * m * k + 2 * (r * k + n * r) + m * r))
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1]), "infer": fwd}


def bytes_needed(case: Case) -> int:
    """A generous estimate of a case's peak: inputs, the dense deq(W0) of the floor and bitsandbytes' per-call
    dequantized copies, PEFT's [M, d] temporaries, the float64 reference."""
    e = case.torch_dtype.itemsize
    md, w = case.m * max(case.in_features, case.out_features), case.in_features * case.out_features
    return e * (10 * md + 4 * w) + 8 * (5 * md + 2 * w)


def _bnb():
    """bitsandbytes (and its functional module), or Unavailable with why not."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except Exception as exc:  # not installed, or an install that does not import (no native library)
        raise Unavailable(f"bitsandbytes does not import ({type(exc).__name__}: {exc})") from None
    return bnb, bf


@dataclass
class Inputs:
    """One case's tensors, shared by every implementation: fresh and random, never zeros."""

    case: Case
    x: torch.Tensor  # [M, in], requires grad
    packed: torch.Tensor | None  # bitsandbytes' packed 4-bit W0 (None: bitsandbytes does not import)
    quant_state: object  # its QuantState
    weight: nn.Parameter  # deq(W0) [out, in] in the case's dtype, frozen (the floor's, the reference's)
    lora_a: nn.Parameter  # [r, in]
    lora_b: nn.Parameter  # [out, r], non-zero so that the LoRA term is checked
    dy: torch.Tensor  # [M, out]
    unavailable: str = ""  # why bitsandbytes cannot run here

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = common.generator(device, seed)
    dt, k, n, r = case.torch_dtype, case.in_features, case.out_features, case.r
    x = common.randn((case.m, k), g, dt).requires_grad_(True)
    w = common.uniform((n, k), g, dt, 1 / math.sqrt(k))  # nn.Linear's init, in the case's dtype
    a = nn.Parameter(common.uniform((r, k), g, dt, 1 / math.sqrt(k)))
    b = nn.Parameter(common.randn((n, r), g, dt, 1 / math.sqrt(r)))
    dy = common.randn((case.m, n), g, dt)
    packed = st = None
    why = ""
    try:
        _, bf = _bnb()
    except Unavailable as exc:
        why = str(exc)
    else:
        from fastpeft.ops.qlora_linear import quant4
        from fastpeft.ops.qlora_linear_torch import dequantize

        packed, st = bf.quantize_4bit(w, blocksize=case.blocksize, quant_type=case.quant_type,
                                      compress_statistics=case.double_quant)
        w = dequantize(quant4(packed, st), dt)
    return Inputs(case, x, packed, st, nn.Parameter(w, requires_grad=False), a, b, dy, why)


def reference(inp: Inputs, kind: str) -> dict:
    """y, dX (and dA, dB for kind "qlora") in float64 from deq(W0) and the case's tensors: LoRA's reference, whose
    W0 is here the dequantized weight."""
    return lora_reference(inp, "lora" if kind == "qlora" else kind)


def _linear4bit(inp: Inputs):
    """A bitsandbytes Linear4bit holding the case's packed W0 and QuantState (shared, no copy)."""
    bnb, _ = _bnb()
    c, st = inp.case, inp.quant_state
    base = bnb.nn.Linear4bit(c.in_features, c.out_features, bias=False, compute_dtype=c.torch_dtype,
                             quant_type=c.quant_type, compress_statistics=c.double_quant, device="meta")
    base.weight = bnb.nn.Params4bit(inp.packed, requires_grad=False, quant_state=st, quant_type=c.quant_type,
                                    blocksize=c.blocksize, compress_statistics=c.double_quant, bnb_quantized=True,
                                    module=base)
    return base


def _peft_layer(inp: Inputs, p: float):
    try:
        import inspect

        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except Exception as exc:  # not installed, or an install that does not import
        raise Unavailable(f"peft does not import ({type(exc).__name__}: {exc})") from None
    c = inp.case
    model = _OneLinear(_linear4bit(inp))
    model.is_loaded_in_4bit = True
    cfg = LoraConfig(r=c.r, lora_alpha=c.scaling * c.r, lora_dropout=p, target_modules=["proj"], bias="none")
    kw = {}
    if "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters:
        kw["autocast_adapter_dtype"] = False  # keep the case's dtype, as every implementation does
    layer = get_peft_model(model, cfg, **kw).base_model.model.proj
    if not isinstance(layer, PeftLinear4bit):
        raise RuntimeError(f"peft made a {type(layer).__name__}, not lora.bnb.Linear4bit")
    la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    la.data, lb.data = inp.lora_a.detach().clone(), inp.lora_b.detach().clone()
    if abs(layer.scaling["default"] - c.scaling) > 1e-12:
        raise RuntimeError(f"peft scaling {layer.scaling['default']} != {c.scaling}")
    return layer, la, lb


def _fastpeft_layer(inp: Inputs, p: float, backend: str):
    import fastpeft
    from fastpeft.modules.lora import QLoRALinear

    c = inp.case
    layer = fastpeft.LoRALinear(_linear4bit(inp), r=c.r, alpha=c.scaling * c.r, dropout=p, backend=backend)
    if not isinstance(layer, QLoRALinear):
        raise RuntimeError(f"fastpeft.LoRALinear over Linear4bit made a {type(layer).__name__}, not QLoRALinear")
    layer.lora_A.data = inp.lora_a.detach().clone().to(layer.lora_A.dtype)
    layer.lora_B.data = inp.lora_b.detach().clone().to(layer.lora_B.dtype)
    if abs(float(layer.scaling) - c.scaling) > 1e-12:
        raise RuntimeError(f"fastpeft scaling {layer.scaling} != {c.scaling}")
    return layer, layer.lora_A, layer.lora_B


def build(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    """An implementation on the case's shared tensors; raises Unavailable with the reason."""
    if name not in ("floor", "peft") and not common.is_fastpeft(name):
        raise common.unknown_impl(name, IMPLS)
    if inp.unavailable:
        raise Unavailable(inp.unavailable)
    p = 0.0 if opts.exact else inp.case.dropout
    notes = ""
    if name == "floor":
        mod = _frozen_linear(inp)
        return common.layer_impl(name, "base", mod, inp.x, inp.dy, {"dx": inp.x}, module=mod, inputs=[inp.weight])
    if name == "peft":
        mod, a, b = _peft_layer(inp, p)
        notes = "autocast_adapter_dtype=False"
    else:
        mod, a, b = _fastpeft_layer(inp, p, common.fastpeft_backend(name, inp.device))
    st = inp.quant_state
    packed_state = [t for t in (st.absmax, getattr(getattr(st, "state2", None), "absmax", None)) if t is not None]
    return common.layer_impl(name, "qlora", mod, inp.x, inp.dy, {"dx": inp.x, "da": a, "db": b}, module=mod,
                             inputs=[inp.packed, *packed_state, a, b], notes=notes)


__all__ = ["NAME", "FLOOR", "IMPLS", "DESCRIPTIONS", "Case", "Inputs", "headline", "cases", "make_inputs",
           "reference", "build", "work", "needs_twin", "tiny", "bytes_needed", "w0_bytes"]
