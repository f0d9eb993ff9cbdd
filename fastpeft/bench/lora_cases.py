"""The LoRA linear benchmark: cases, the implementations compared, their correctness check, one case's run.

Implementations, all on the same tensors (x, W0, A, B, dY) of a case:
  floor            the frozen base nn.Linear alone: what LoRA would cost if it were free
  eager            LoRA as HF PEFT writes it, in eager PyTorch: base(x) + B(A(dropout(x)))·s
  peft             HF PEFT's own LoraLayer (get_peft_model on a one-Linear model), when peft imports
  addmm            the cuBLAS-addmm recipe of unsloth-style libraries: out = x@W0ᵀ; out.addmm_(x@Aᵀ, Bᵀ, alpha=s),
                   its own autograd.Function saving x and x@Aᵀ
  fastpeft[<b>]    fastpeft.LoRALinear for each backend b that can run on the device
"""
from __future__ import annotations

import dataclasses
import gc
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import harness

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METRICS = ("fwd", "bwd", "fwd_bwd", "infer")
BASELINES = ("eager", "peft", "addmm")
IMPL_FAMILIES = ("floor", "eager", "peft", "addmm", "fastpeft")
DESCRIPTIONS = {
    "floor": "frozen nn.Linear alone (the floor)",
    "eager": "eager PEFT-style: base(x) + B(A(dropout(x)))*s",
    "peft": "HF PEFT LoraLayer",
    "addmm": "cuBLAS addmm recipe (unsloth-style autograd.Function)",
    "fastpeft[torch]": "fastpeft.LoRALinear, PyTorch backend",
    "fastpeft[triton]": "fastpeft.LoRALinear, Triton kernels",
}
# Same numbers as tests/tolerances.py (atol relative to the reference's RMS, rtol); the bench does not import tests.
TOLERANCES = {torch.float32: (2e-3, 2e-3), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


@dataclass(frozen=True)
class Case:
    m: int
    in_features: int
    out_features: int
    r: int
    dtype: str = "bf16"
    dropout: float = 0.0
    tags: tuple = field(default=(), compare=False)

    @property
    def key(self) -> tuple:
        return (self.m, self.in_features, self.out_features, self.r, self.dtype, self.dropout)

    @property
    def label(self) -> str:
        return f"M={self.m} {self.in_features}x{self.out_features} r={self.r} {self.dtype} p={self.dropout:g}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def alpha(self) -> float:
        return 2.0 * self.r  # scaling s = alpha / r = 2: a LoRA term as large as the base term, so a wrong one shows

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("m", "in_features", "out_features", "r", "dtype", "dropout")}
        d["tags"] = list(self.tags)
        d["label"] = self.label
        return d


# ----------------------------------------------------------------------------------------------- presets
# The full cross product of the axes (6 M x 4 widths x 4 ranks x 2 dropouts = 192 cases) would take
# about 6 minutes per implementation for ONE forward+backward each on an H100 (sum of 6·M·in·out FLOPs), so
# the full grid varies one axis at a time around the headline case, plus the decode cases at every width.
HEADLINE = dict(m=8192, shape=(4096, 4096), r=16, dropout=0.1)
AXES = dict(
    m=(1, 16, 128, 2048, 8192, 16384),
    shape=((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)),
    r=(8, 16, 64, 128),
    dropout=(0.0, 0.1),
)
PRESETS = {
    "full": dict(headline=HEADLINE, axes=AXES, decode_m=(1, 16), dtype="bf16",
                 timing=dict(warmup_ms=25, rep_ms=80, min_reps=10, max_reps=300)),
    "quick": dict(headline=HEADLINE, axes=dict(m=(2048, 8192), shape=((4096, 4096), (4096, 11008))),
                  decode_m=(1, 16), decode_shapes=((4096, 4096),), dtype="bf16",
                  timing=dict(warmup_ms=10, rep_ms=50, min_reps=10, max_reps=200)),
    # small sizes for a CPU-only machine: the PyTorch backend against the baselines, in fp32
    "cpu": dict(headline=dict(m=256, shape=(512, 512), r=16, dropout=0.1),
                axes=dict(m=(1, 16, 256, 1024), shape=((512, 512), (512, 1376), (1376, 512)), r=(8, 16, 64), dropout=(0.0, 0.1)),
                decode_m=(), dtype="fp32", threads=1,  # one thread: steady figures on a shared machine
                timing=dict(warmup_ms=3, rep_ms=25, min_reps=5, max_reps=200)),
}


def _case(m, shape, r, dtype, dropout, *tags) -> Case:
    return Case(int(m), int(shape[0]), int(shape[1]), int(r), dtype, float(dropout), tuple(tags))


def _dedupe(cases: list[Case]) -> list[Case]:
    merged: dict[tuple, Case] = {}
    for c in cases:
        if c.key in merged:
            old = merged[c.key]
            merged[c.key] = dataclasses.replace(old, tags=old.tags + tuple(t for t in c.tags if t not in old.tags))
        else:
            merged[c.key] = c
    return list(merged.values())


def preset_cases(preset: str, dtypes: list[str] | None = None) -> list[Case]:
    """The cases of a preset: headline first, then decode, then each axis varied around the headline."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]
    h = spec["headline"]
    cases = []
    for dt in dtypes or [spec["dtype"]]:
        cases.append(_case(h["m"], h["shape"], h["r"], dt, h["dropout"], "headline"))
        decode = [_case(m, shape, h["r"], dt, 0.0, "decode")
                  for m in spec["decode_m"] for shape in spec.get("decode_shapes", spec["axes"].get("shape", (h["shape"],)))]
        if decode:  # M=1 at the headline width is a headline case; the other decode cases go last
            cases.append(dataclasses.replace(decode[0], tags=("decode", "headline")))
        for axis, values in spec["axes"].items():
            for v in values:
                p = dict(h, **{axis: v})
                cases.append(_case(p["m"], p["shape"], p["r"], dt, p["dropout"], f"axis:{axis}"))
        cases += decode[1:]
    return _dedupe(cases)


def grid_cases(preset: str, *, m=None, shape=None, r=None, dropout=None, dtypes=None) -> list[Case]:
    """Explicit axes: the cross product of the given values; an axis not given takes the preset's headline value."""
    if all(v is None for v in (m, shape, r, dropout)):
        return preset_cases(preset, dtypes)
    h = PRESETS[preset]["headline"]
    cases = []
    for dt in dtypes or [PRESETS[preset]["dtype"]]:
        for mm in m or [h["m"]]:
            for sh in shape or [h["shape"]]:
                for rr in r or [h["r"]]:
                    for p in dropout if dropout is not None else [h["dropout"]]:
                        cases.append(_case(mm, sh, rr, dt, p, "custom"))
    return _dedupe(cases)


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """One case's tensors, shared by every implementation: x and dY fresh and random, never zeros."""

    case: Case
    x: torch.Tensor  # [M, in], requires grad (a layer inside a network gets dX asked of it)
    weight: nn.Parameter  # W0 [out, in], frozen
    lora_a: nn.Parameter  # [r, in]
    lora_b: nn.Parameter  # [out, r], non-zero so that the LoRA term is checked
    dy: torch.Tensor  # [M, out]

    @property
    def device(self) -> torch.device:
        return self.x.device


def make_inputs(case: Case, device: torch.device | str, seed: int = 0) -> Inputs:
    device = torch.device(device)
    dt = case.torch_dtype
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=g)

    def uniform(shape, bound):
        return (torch.rand(shape, **kw) * 2 - 1).mul_(bound).to(dt)

    k, n, r = case.in_features, case.out_features, case.r
    x = torch.randn(case.m, k, **kw).to(dt).requires_grad_(True)
    w = nn.Parameter(uniform((n, k), 1 / math.sqrt(k)), requires_grad=False)  # nn.Linear's init
    a = nn.Parameter(uniform((r, k), 1 / math.sqrt(k)))  # PEFT's kaiming-uniform(a=sqrt 5) bound
    b = nn.Parameter((torch.randn(n, r, **kw) / math.sqrt(r)).to(dt))
    dy = torch.randn(case.m, n, **kw).to(dt)
    return Inputs(case, x, w, a, b, dy)


def bytes_needed(case: Case) -> int:
    """A generous estimate of one case's peak memory: the inputs, the eager baselines' [M, d] temporaries,
    and the fp32 reference of the check."""
    e = case.torch_dtype.itemsize
    md = case.m * max(case.in_features, case.out_features)
    w = case.in_features * case.out_features
    return e * (10 * md + w) + 4 * (5 * md + w)


# ----------------------------------------------------------------------------------------------- implementations
class Unavailable(Exception):
    """This implementation cannot run here; the message says why (recorded as a skip)."""


@dataclass
class Impl:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    set_training: Callable[[bool], None]
    lora_params: tuple  # (A, B) as this implementation holds them; () for the floor
    inputs: list  # tensors counted as inputs, not activations, by the saved-tensor count
    grads: list  # tensors whose .grad a backward fills (reset before each repetition)
    notes: str = ""


def _frozen_linear(inp: Inputs) -> nn.Linear:
    lin = nn.Linear(inp.case.in_features, inp.case.out_features, bias=False, device="meta")
    lin.weight = inp.weight  # the shared W0, no copy
    return lin


def _module_impl(name, module, lora_params, inp, notes="") -> Impl:
    return Impl(name, module, module.train, tuple(lora_params), [inp.x, inp.weight, *lora_params],
                [inp.x, *lora_params], notes)


def build_floor(inp: Inputs, p: float) -> Impl:
    return _module_impl("floor", _frozen_linear(inp), (), inp)


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


def build_eager(inp: Inputs, p: float) -> Impl:
    return _module_impl("eager", EagerLoRA(inp, p), (inp.lora_a, inp.lora_b), inp)


class _OneLinear(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def build_peft(inp: Inputs, p: float) -> Impl:
    try:
        import inspect

        from peft import LoraConfig, get_peft_model
    except Exception as exc:  # not installed, or an install that does not import
        raise Unavailable(f"peft does not import ({type(exc).__name__}: {exc})") from None
    c = inp.case
    cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=p, target_modules=["proj"], bias="none")
    kw = {}
    if "autocast_adapter_dtype" in inspect.signature(get_peft_model).parameters:
        # PEFT's default upcasts bf16/fp16 adapters to fp32 (and then x to fp32 in forward); keep them in the
        # case's dtype so that every implementation computes on the same tensors.
        kw["autocast_adapter_dtype"] = False
    model = get_peft_model(_OneLinear(_frozen_linear(inp)), cfg, **kw)
    layer = model.base_model.model.proj
    la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        la.data = inp.lora_a.detach().clone()
        lb.data = inp.lora_b.detach().clone()
    if abs(layer.scaling["default"] - c.scaling) > 1e-12:
        raise RuntimeError(f"peft scaling {layer.scaling['default']} != {c.scaling}")
    return _module_impl("peft", layer, (la, lb), inp, notes="autocast_adapter_dtype=False")


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


def build_addmm(inp: Inputs, p: float) -> Impl:
    if inp.x.dim() != 2:
        raise Unavailable("the addmm recipe takes 2-D x")
    return _module_impl("addmm", AddmmLoRA(inp, p), (inp.lora_a, inp.lora_b), inp)


def fastpeft_backends(device: torch.device) -> dict[str, str | None]:
    """Each fastpeft backend -> None if it is timed on this device, else why not."""
    try:
        import fastpeft
        from fastpeft._backend import triton_unavailable_reason

        fastpeft.LoRALinear  # noqa: B018 - the op may not be there yet in a partial checkout
    except Exception as exc:
        reason = f"fastpeft.LoRALinear does not import ({type(exc).__name__}: {exc})"
        return {"torch": reason, "triton": reason}
    if device.type == "cuda":
        triton_reason = triton_unavailable_reason(device)
    else:
        triton_reason = "the Triton interpreter on the CPU is a test vehicle, not a speed figure"
    return {"torch": None, "triton": triton_reason}


def build_fastpeft(inp: Inputs, p: float, backend: str) -> Impl:
    reason = fastpeft_backends(inp.device).get(backend, f"unknown backend {backend!r}")
    if reason is not None:
        raise Unavailable(reason)
    import fastpeft

    c = inp.case
    layer = fastpeft.LoRALinear(_frozen_linear(inp), r=c.r, alpha=c.alpha, dropout=p, backend=backend)
    with torch.no_grad():
        layer.lora_A.data = inp.lora_a.detach().clone().to(layer.lora_A.dtype)
        layer.lora_B.data = inp.lora_b.detach().clone().to(layer.lora_B.dtype)
    if abs(float(layer.scaling) - c.scaling) > 1e-12:
        raise RuntimeError(f"fastpeft scaling {layer.scaling} != {c.scaling}")
    return _module_impl(f"fastpeft[{backend}]", layer, (layer.lora_A, layer.lora_B), inp)


def impl_names(device: torch.device, families=IMPL_FAMILIES, backends=("torch", "triton")) -> list[str]:
    names = []
    for f in families:
        if f == "fastpeft":
            names += [f"fastpeft[{b}]" for b in backends]
        else:
            names.append(f)
    return names


def build(name: str, inp: Inputs, p: float) -> Impl:
    """Build an implementation by name on the case's shared tensors; raises Unavailable with the reason."""
    if name.startswith("fastpeft[") and name.endswith("]"):
        return build_fastpeft(inp, p, name[len("fastpeft["):-1])
    builders = {"floor": build_floor, "eager": build_eager, "peft": build_peft, "addmm": build_addmm}
    if name not in builders:
        raise ValueError(f"impl: expected one of {impl_names(inp.device)}, got {name!r}")
    return builders[name](inp, p)


def auto_fastpeft(device: torch.device) -> str:
    """The fastpeft implementation a user gets by default on this device (the one the ratios headline)."""
    try:
        from fastpeft._backend import resolve_backend

        return f"fastpeft[{resolve_backend(None, device)}]"
    except Exception:
        return "fastpeft[torch]"


# ----------------------------------------------------------------------------------------------- correctness
def reference(inp: Inputs, lora: bool = True) -> dict:
    """y, dX, dA, dB of the floor (+ LoRA) from the case's tensors, in float64 on the CPU or fp32 at full
    precision (no TF32) on a GPU."""
    rdt = torch.float64 if inp.device.type == "cpu" else torch.float32
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        x, w, dy = (t.detach().to(rdt) for t in (inp.x, inp.weight, inp.dy))
        y, dx = x @ w.t(), dy @ w
        out = {"y": y, "dx": dx}
        if lora:
            a, b, s = inp.lora_a.detach().to(rdt), inp.lora_b.detach().to(rdt), inp.case.scaling
            xa, ds = x @ a.t(), dy @ b
            y.add_(xa @ b.t(), alpha=s)
            dx.add_(ds @ a, alpha=s)
            out["da"] = (ds.t() @ x).mul_(s)
            out["db"] = (dy.t() @ xa).mul_(s)
        return out
    finally:
        torch.set_float32_matmul_precision(prec)


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Worst |a - e| / (atol·rms(e) + rtol·|e|) over the elements: <= 1 passes."""
    atol, rtol = TOLERANCES[dtype]
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    a = actual.detach().to(expected.dtype)
    if not bool(torch.isfinite(a).all()):
        return math.inf
    rms = float(expected.pow(2).mean().sqrt()) if expected.numel() else 0.0
    bound = expected.abs().mul_(rtol).add_(atol * max(rms, 1e-30))
    return float(((a - expected).abs_() / bound).max()) if expected.numel() else 0.0


def _grads_of(impl: Impl, inp: Inputs) -> dict:
    g = {"dx": inp.x.grad}
    if impl.lora_params:
        g["da"], g["db"] = impl.lora_params[0].grad, impl.lora_params[1].grad
    return g


def check_outputs(impl: Impl, inp: Inputs, y: torch.Tensor, ref: dict) -> dict:
    """Compare y and every gradient with the reference; returns {"ok", "worst", "what"}."""
    got = {"y": y, **_grads_of(impl, inp)}
    worst, what = 0.0, ""
    for k, v in got.items():
        e = math.inf if v is None else compare(v, ref[k], inp.case.torch_dtype)
        if not e <= worst:
            worst, what = e, k
    return {"ok": worst <= 1.0, "worst": worst if math.isfinite(worst) else None, "what": what}


def check_finite(impl: Impl, inp: Inputs, y: torch.Tensor) -> dict:
    """At dropout > 0 the masks differ from any reference: the shapes and finiteness of y and the gradients."""
    want = {"y": (inp.case.m, inp.case.out_features), "dx": tuple(inp.x.shape)}
    if impl.lora_params:
        want["da"], want["db"] = tuple(impl.lora_params[0].shape), tuple(impl.lora_params[1].shape)
    got = {"y": y, **_grads_of(impl, inp)}
    for k, shape in want.items():
        v = got[k]
        if v is None or tuple(v.shape) != shape or not bool(torch.isfinite(v).all()):
            return {"ok": False, "what": k}
    return {"ok": True, "what": ""}


# ----------------------------------------------------------------------------------------------- one case
@dataclass
class Settings:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000
    flush: str = "auto"  # "auto": flush L2 for memory-bound cases on CUDA; "always"; "never"
    metrics: tuple = METRICS
    seed: int = 0


RIDGE_FLOP_PER_BYTE = 300.0  # H100/H200 bf16: ~990 TFLOP/s over ~3.4-4.8 TB/s


def memory_bound(case: Case) -> bool:
    """Whether the base GEMM reads more bytes than it can hide behind its FLOPs (then a warm L2 would flatter it)."""
    e = case.torch_dtype.itemsize
    k, n, m = case.in_features, case.out_features, case.m
    return 2.0 * m * k * n / (e * (m * k + k * n + m * n)) < RIDGE_FLOP_PER_BYTE


def _result(case: Case, name: str, status: str, reason: str = "", **kw) -> dict:
    return {"case": case.as_dict(), "impl": name, "status": status, "reason": reason, **kw}


def _time_metrics(impl: Impl, inp: Inputs, st: Settings, flush: bool) -> dict:
    x, dy, dev = inp.x, inp.dy, inp.device
    kw = dict(warmup_ms=st.warmup_ms, rep_ms=st.rep_ms, min_reps=st.min_reps, max_reps=st.max_reps, flush_l2=flush)

    def reset():
        harness.reset_grads(impl.grads)

    out = {}
    impl.set_training(True)
    if "fwd" in st.metrics:
        out["fwd"] = harness.time_fn(lambda: impl.forward(x), dev, setup=reset, **kw)
    if "bwd" in st.metrics:
        y = impl.forward(x)
        out["bwd"] = harness.time_fn(lambda: y.backward(dy, retain_graph=True), dev, setup=reset, **kw)
        del y
    if "fwd_bwd" in st.metrics:
        out["fwd_bwd"] = harness.time_fn(lambda: impl.forward(x).backward(dy), dev, setup=reset, **kw)
    if "infer" in st.metrics:
        impl.set_training(False)

        def infer():
            with torch.no_grad():
                impl.forward(x)

        out["infer"] = harness.time_fn(infer, dev, **kw)
        impl.set_training(True)
    reset()
    return out


def _free(device: torch.device) -> None:
    # once per case, on CUDA only: a full collection costs ~0.5 s once transformers is imported
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def footprint_and_check(impl: Impl, inp: Inputs, ref_cache: dict) -> tuple[harness.Footprint, dict]:
    """One warm-up forward+backward, then one measured (peak memory, saved tensors), then the correctness
    check: at p=0 y and every gradient against the reference; at p>0 shapes and finiteness, and the same
    implementation built at p=0 against the reference. ref_cache holds the case's reference between calls."""
    p = inp.case.dropout
    lora = bool(impl.lora_params)

    def ref():
        if lora not in ref_cache:
            ref_cache[lora] = reference(inp, lora)
        return ref_cache[lora]

    impl.set_training(True)
    # warm-up: compilation and autotuning allocate; keep them out of the memory figure
    harness.fwd_bwd_footprint(impl.forward, inp.x, inp.dy, inputs=impl.inputs, grads=impl.grads)
    fp = harness.fwd_bwd_footprint(impl.forward, inp.x, inp.dy, inputs=impl.inputs, grads=impl.grads)
    if p == 0:
        check = check_outputs(impl, inp, fp.output, ref())
        check["mode"] = "p=0: y, dX, dA, dB vs the reference"
    else:
        check = check_finite(impl, inp, fp.output)
        if check["ok"]:
            twin = build(impl.name, inp, 0.0)
            twin.set_training(True)
            y0 = harness.fwd_bwd_footprint(twin.forward, inp.x, inp.dy, inputs=twin.inputs, grads=twin.grads).output
            check = check_outputs(twin, inp, y0, ref())
            harness.reset_grads(twin.grads)
            del twin, y0
        check["mode"] = "p>0: y and grads finite with the right shapes; the same implementation at p=0 vs the reference"
    harness.reset_grads(impl.grads)
    return fp, check


def run_impl(name: str, inp: Inputs, st: Settings, ref_cache: dict) -> dict:
    """Build, check, measure memory and time one implementation on one case's tensors."""
    case = inp.case
    try:
        impl = build(name, inp, case.dropout)
    except Unavailable as exc:
        return _result(case, name, "skip", str(exc))
    fp, check = footprint_and_check(impl, inp, ref_cache)
    res = _result(
        case, name, "ok" if check["ok"] else "fail", "" if check["ok"] else f"check failed on {check['what']}",
        check=check, peak_bytes=fp.peak_bytes, saved_bytes=fp.saved.total_bytes,
        saved_beyond_inputs_bytes=fp.saved.beyond_inputs_bytes, saved_beyond_inputs=fp.saved.beyond_inputs,
        notes=impl.notes,
    )
    del fp
    if not check["ok"]:
        return res  # a wrong implementation is not timed
    flush = st.flush == "always" or (st.flush == "auto" and inp.device.type == "cuda" and memory_bound(case))
    times = _time_metrics(impl, inp, st, flush)
    res["l2_flush"] = flush
    res["times_ms"] = {k: t.median_ms for k, t in times.items()}
    res["timing"] = {k: t.as_dict() for k, t in times.items()}
    return res


def run_case(case: Case, names: list[str], device: torch.device, st: Settings,
             on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Every implementation on one case's fresh inputs; a failure of one never stops the others."""
    results = []

    def emit(r):
        results.append(r)
        if on_result:
            on_result(r)

    avail = None
    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            import os

            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    need = bytes_needed(case)
    if avail is not None and need > 0.9 * avail:
        for n in names:
            emit(_result(case, n, "skip", f"needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free"))
        return results
    inp = make_inputs(case, device, st.seed)
    ref_cache: dict = {}
    for n in names:
        try:
            emit(run_impl(n, inp, st, ref_cache))
        except torch.cuda.OutOfMemoryError as exc:
            emit(_result(case, n, "skip", f"out of memory: {str(exc).splitlines()[0]}"))
        except Exception as exc:  # recorded, and the run goes on: one broken implementation must not hide the rest
            emit(_result(case, n, "error", f"{type(exc).__name__}: {exc}"))
        harness.reset_grads([inp.x, inp.lora_a, inp.lora_b])
    del inp, ref_cache
    _free(device)
    return results


# ----------------------------------------------------------------------------------------------- time estimate
def estimate_seconds(cases: list[Case], n_impls: int, st: Settings, device: torch.device) -> float:
    """A rough run time: per implementation and metric, warm-up + max(rep_ms, min_reps calls) + per-call
    overhead, with calls modelled at ~60% of an H100's bf16 peak (CUDA) or ~50 GFLOP/s (CPU)."""
    total = 0.0
    for c in cases:
        flops = 2.0 * c.m * c.in_features * c.out_features
        e = c.torch_dtype.itemsize
        if device.type == "cuda":
            rate = {2: 600e12, 4: 50e12}[e]
            bw = 2.5e12
            overhead = 2e-4 if memory_bound(c) else 6e-5  # sync + L2 flush per repetition
        else:
            rate, bw, overhead = 2e10, 1e10, 3e-4
        bytes_ = e * (c.m * c.in_features + c.in_features * c.out_features + c.m * c.out_features)
        t_fwd = max(flops / rate, bytes_ / bw) + 3e-5
        per_metric = {"fwd": t_fwd, "bwd": 2 * t_fwd, "fwd_bwd": 3 * t_fwd, "infer": t_fwd}
        for k in st.metrics:
            t = per_metric[k]
            n = max(st.min_reps, min(st.max_reps, int(st.rep_ms / 1e3 / t)))
            total += n_impls * (st.warmup_ms / 1e3 + 4 * t + n * (t + overhead))
        total += n_impls * 3 * 3 * t_fwd + 0.3  # warm-up, footprint and check runs; inputs and reference
    return total


__all__ = [
    "Case", "Inputs", "Impl", "Settings", "Unavailable", "PRESETS", "AXES", "HEADLINE", "METRICS", "BASELINES",
    "DESCRIPTIONS", "preset_cases", "grid_cases", "make_inputs", "build", "impl_names", "auto_fastpeft",
    "fastpeft_backends", "reference", "compare", "check_outputs", "footprint_and_check", "run_impl", "run_case", "estimate_seconds",
    "memory_bound", "AddmmLoRAFunction", "EagerLoRA",
]
