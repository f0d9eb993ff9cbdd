"""GaLore: the gradient-free layer's backward, the optimizer step and the projector refresh (kind of a case).

  layer    a linear layer's training step, [out, in] weight, M tokens:
             floor          standard backward: dX and the full [out, in] dW (GaLore on ordinary gradients)
             eager          the same, then R = projection of dW (galore-torch's path up to its optimizer)
             fastpeft[<b>]  fastpeft's gradient-free linear: dX and R = (dY·P)ᵀ·X, dW never formed
                            (cublas: R accumulated by cuBLAS as its fp32 C input)
           (the issue's target: gradient-free <= 0.8x standard at rank 128)
  step     one non-refresh optimizer step from a given gradient, basis and moments:
             eager          GaLore AdamW in plain PyTorch (an m x n update temporary, as galore-torch)
             compiled       torch.compile of eager
             galore_torch   galore-torch's AdamW, when installed
             fastpeft[<b>]  fastpeft.optim.GaLoreAdamW (Triton: projection with Adam in its epilogue,
                            in-place rank-r update)
  refresh  a new rank-r basis for G = dYᵀ·X (G with a decaying spectrum, as real gradients have):
             svd                   torch.linalg.svd of the formed fp32 G (galore-torch's refresh)
             fastpeft[randomized]  the randomized range finder through X and dY, never forming G
           checked by the gradient energy the basis captures against the optimal (float64 eigenvalues);
           the issue's target: >= 10x faster than the SVD at [4096, 11008], rank 128
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import common, opspec
from .common import BuildOptions, Unavailable

NAME = "galore"
METRICS = ("fwd", "bwd", "fwd_bwd", "step", "refresh")
FLOOR = "floor"
RANDOMIZED = "fastpeft[randomized]"
HAS_CUBLAS = True  # the layer's backward; the optimizer step has no cuBLAS path (Unavailable there)
KIND_IMPLS = {"layer": ("floor", "eager", "fastpeft"), "step": ("eager", common.COMPILED, "galore_torch", "fastpeft"),
              "refresh": ("svd", RANDOMIZED)}
IMPLS = ("floor", "eager", common.COMPILED, "galore_torch", "svd", "fastpeft", RANDOMIZED)
DESCRIPTIONS = {
    "floor": "standard linear backward: dX and the full dW",
    "eager": "layer: standard backward + projection of dW; step: GaLore AdamW in plain PyTorch",
    common.COMPILED: common.COMPILED_DESCRIPTION + " (step)",
    "galore_torch": "galore-torch's GaLore AdamW step",
    "svd": "torch.linalg.svd of the formed fp32 gradient",
    "fastpeft[torch]": "layer: fastpeft gradient-free linear; step: GaLoreAdamW, PyTorch backend",
    "fastpeft[triton]": "layer: fastpeft gradient-free linear; step: GaLoreAdamW, Triton kernels",
    "fastpeft[cublas]": "layer: fastpeft gradient-free linear, R = (dY·P)ᵀ·X by cuBLAS into fp32 R (layer only)",
    RANDOMIZED: "fastpeft randomized range finder through X and dY",
}
BETAS, EPS, SCALE, OVERSAMPLE, POWER_ITERS = (0.9, 0.999), 1e-6, 0.25, 8, 2


@dataclass(frozen=True)
class Case(common.CaseMixin):
    kind: str  # layer, step or refresh
    m: int  # tokens (layer, refresh)
    out_features: int
    in_features: int
    rank: int
    dtype: str = "bf16"
    tags: tuple = field(default=(), compare=False)

    @property
    def label(self) -> str:
        tokens = "" if self.kind == "step" else f" M={self.m}"
        return f"{self.kind}{tokens} {self.out_features}x{self.in_features} r={self.rank} {self.dtype}"

    @property
    def side(self) -> str:
        from fastpeft.optim import projector as pj

        return pj.projection_side((self.out_features, self.in_features), "std")


def headline(preset: str) -> Case:
    if preset == "cpu":
        return Case("layer", 256, 512, 1376, 64, "fp32", ("headline",))
    if preset == "smoke":
        return Case("layer", 7, 24, 40, 4, "fp32", ("headline",))
    return Case("layer", 8192, 4096, 4096, 128, "bf16", ("headline",))


def cases(preset: str) -> list[Case]:
    h = headline(preset)

    def c(kind, m, out, inp, r, *tags):
        return Case(kind, m, out, inp, r, h.dtype, tags)

    if preset == "smoke":
        return [h, c("step", 1, 24, 40, 4, "headline"), c("step", 1, 40, 24, 3, "side:right"),
                c("refresh", 33, 24, 40, 4, "headline")]
    if preset == "cpu":
        return [h, c("step", 1, 512, 1376, 64, "headline"), c("refresh", 256, 512, 1376, 64, "headline")]
    if preset == "quick":
        return [h, c("step", 1, 4096, 4096, 128, "headline"), c("refresh", 8192, 4096, 11008, 128, "headline")]
    grid = [c(kind, 1 if kind == "step" else 8192, 4096, i, r, "grid")
            for kind in ("layer", "step", "refresh") for i in (4096, 11008) for r in (128, 512)]
    return common.dedupe([h, *grid])


def main_metric(case: Case) -> str:
    return {"layer": "fwd_bwd", "step": "step", "refresh": "refresh"}[case.kind]


def families(case: Case) -> tuple:
    return KIND_IMPLS[case.kind]


def work(case: Case) -> dict:
    """Necessary FLOPs and bytes. layer: the gradient-free backward (dX and R); step: R = projection of G,
    Adam on R, the rank-r update of W in place; refresh: the randomized finder's 2 + 2·power_iters skinny
    products through X and dY (the SVD has no smaller necessary work to count)."""
    e, m, o, i, r = case.torch_dtype.itemsize, case.m, case.out_features, case.in_features, case.rank
    low = r * (i if case.side == "left" else o)
    basis = r * (o if case.side == "left" else i)
    if case.kind == "step":
        return {"step": (4.0 * r * o * i + 10.0 * low, e * (3 * o * i + basis) + 4 * 4 * low)}
    if case.kind == "refresh":
        k, n_apply = r + OVERSAMPLE, 2 + 2 * POWER_ITERS
        return {"refresh": (n_apply * 2.0 * m * k * (i + o), n_apply * e * m * (i + o))}
    fwd = (2.0 * m * o * i, e * (m * i + o * i + m * o))
    bwd = (2.0 * m * o * i + 2.0 * m * r * (o + i), e * (m * o + o * i + 2 * m * i + basis) + 4 * low)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}


def bytes_needed(case: Case) -> int:
    m, oi = case.m, case.out_features * case.in_features
    mn = m * (case.out_features + case.in_features)
    return case.torch_dtype.itemsize * (4 * mn + 4 * oi) + 8 * (2 * mn + 3 * oi)


@dataclass
class Inputs:
    case: Case
    tensors: dict  # x, w, dy, basis (layer); w0, g, basis, m0, v0 (step); x, dy, g64 (refresh)
    alpha: float = 0.0  # step: lr·sqrt(1-b2²)/(1-b1²)·scale of the checked step (t = 2)
    lr: float = 0.0

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __getattr__(self, name):
        try:
            return self.__dict__["tensors"][name]
        except KeyError:
            raise AttributeError(name) from None


def _orthonormal(rows: int, cols: int, g, dtype) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, device=g.device, dtype=torch.float64))[0].to(dtype)


def _basis(case: Case, g) -> tuple:
    """(P, Q): P [out, r] orthonormal columns (left side) or Q [r, in] orthonormal rows (right side)."""
    if case.side == "left":
        return _orthonormal(case.out_features, case.rank, g, case.torch_dtype), None
    return None, _orthonormal(case.in_features, case.rank, g, case.torch_dtype).t().contiguous()


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    g = common.generator(device, seed)
    dt, m, o, i, r = case.torch_dtype, case.m, case.out_features, case.in_features, case.rank
    if case.kind == "layer":
        p, q = _basis(case, g)
        return Inputs(case, dict(x=common.randn((m, i), g, dt).requires_grad_(True),
                                 w=common.uniform((o, i), g, dt, 1 / math.sqrt(i)).requires_grad_(True),
                                 dy=common.randn((m, o), g, dt), p=p, q=q))
    if case.kind == "step":
        p, q = _basis(case, g)
        low = (r, i) if case.side == "left" else (o, r)
        t = 2  # the checked step is the second (the first was the refresh)
        dim = o if case.side == "left" else i
        alpha = 0.02 * math.sqrt(dim / r)  # an update as large as W itself, so that a wrong one shows in bf16
        lr = alpha / (math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t) * SCALE)
        v0 = 0.5 + torch.rand(low, generator=g, device=g.device)
        return Inputs(case, dict(w0=common.randn((o, i), g, dt, 0.02), g=common.randn((o, i), g, dt), p=p, q=q,
                                 m0=common.randn(low, g, torch.float32), v0=v0), alpha, lr)
    # refresh: G = dYᵀ·X of rank about r/2 plus a little noise: a spectrum with a gap, as trained layers show
    k = max(1, r // 2)
    lat = torch.randn(m, k, generator=g, device=g.device) * torch.linspace(1.0, 0.3, k, device=g.device)
    x = lat @ torch.randn(k, i, generator=g, device=g.device) + 0.01 * torch.randn(m, i, generator=g, device=g.device)
    dy = lat @ torch.randn(k, o, generator=g, device=g.device) + 0.01 * torch.randn(m, o, generator=g, device=g.device)
    x, dy = x.to(dt), dy.to(dt)
    return Inputs(case, dict(x=x, dy=dy, g64=dy.to(torch.float64).t() @ x.to(torch.float64)))


def _project(gm, p, q):
    return p.t() @ gm if p is not None else gm @ q.t()


def _back(n, p, q):
    return p @ n if p is not None else n @ q


def _energy(inp: Inputs, p, q) -> torch.Tensor:
    """||projection of G||² in float64 for a basis (the energy it captures)."""
    return _project(inp.g64, *(None if t is None else t.to(torch.float64) for t in (p, q))).square().sum()


def reference(inp: Inputs, kind: str) -> dict:
    c = inp.case
    if c.kind == "refresh":  # the optimal: the top-r eigenvalues of the smaller Gram matrix of G
        gm = inp.g64
        gram = gm @ gm.t() if gm.shape[0] <= gm.shape[1] else gm.t() @ gm
        return {"energy": torch.linalg.eigvalsh(gram).flip(0)[:c.rank].sum()}
    p, q = (None if t is None else t.to(torch.float64) for t in (inp.p, inp.q))
    if c.kind == "step":
        gm, m0, v0 = common.f64(inp.g, inp.m0, inp.v0)
        r = _project(gm, p, q)
        m = BETAS[0] * m0 + (1 - BETAS[0]) * r
        v = BETAS[1] * v0 + (1 - BETAS[1]) * r * r
        return {"dw": -inp.alpha * _back(m / (v.sqrt() + EPS), p, q), "exp_avg": m, "exp_avg_sq": v}
    x, w, dy = common.f64(inp.x, inp.w, inp.dy)
    dw = dy.t() @ x
    return {"y": x @ w.t(), "dx": dy @ w, "dw": dw, "r": _project(dw, p, q)}


def _layer(name: str, inp: Inputs) -> common.Impl:
    x, w, dy = inp.x, inp.w, inp.dy
    if name == "floor":
        return common.layer_impl(name, "layer", lambda t: F.linear(t, w), x, dy, {"dx": x, "dw": w}, infer=False)
    if name == "eager":
        post = lambda: {"r": _project(w.grad, inp.p, inp.q)}  # noqa: E731
        return common.layer_impl(name, "layer", lambda t: F.linear(t, w), x, dy, {"dx": x}, post=post, infer=False,
                                 reset=lambda: setattr(w, "grad", None), inputs=[w])
    import fastpeft.galore as fg

    c = inp.case
    lin = torch.nn.Linear(c.in_features, c.out_features, bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w.detach())  # W's storage, with this implementation's GaLore state
    fg.enable(torch.nn.Sequential(lin), ["0"], rank=c.rank, update_proj_gap=10**9, scale=SCALE,
              oversample=OVERSAMPLE, power_iters=POWER_ITERS,
              backend=common.fastpeft_backend(name, inp.device, has_cublas=HAS_CUBLAS))
    st = fg.galore_state(lin.weight)
    st.P, st.Q, st.refresh_due = inp.p, inp.q, False  # the case's basis: a non-refresh step
    return common.layer_impl(name, "layer", lin, x, dy, {"dx": x}, post=lambda: {"r": st.R if st.has_R else None},
                             reset=st.discard, infer=False, inputs=[lin.weight])


def eager_step(w, g, p, q, m, v, alpha: float, b1: float, b2: float, eps: float) -> None:
    """One GaLore AdamW step in plain PyTorch, as galore-torch computes it (the update is an m x n temporary)."""
    r = _project(g, p, q).float()
    m.mul_(b1).add_(r, alpha=1 - b1)
    v.mul_(b2).addcmul_(r, r, value=1 - b2)
    n = m / (v.sqrt() + eps)
    upd = _back(n, None if p is None else p.float(), None if q is None else q.float())
    # not w.add_(upd, alpha=-alpha): torch 2.13's inductor (CPU) drops alpha when upd is a matmul
    w.sub_(upd.mul_(alpha).to(w.dtype))


def load_galore_torch():
    """galore-torch's AdamW without its package __init__ (which imports bitsandbytes), or None."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("_galore_torch_bench")
    pkg.__path__ = [root]
    sys.modules["_galore_torch_bench"] = pkg
    for name in ("galore_projector", "adamw"):
        s = importlib.util.spec_from_file_location(f"_galore_torch_bench.{name}", os.path.join(root, f"{name}.py"))
        mod = importlib.util.module_from_spec(s)
        sys.modules[s.name] = mod
        s.loader.exec_module(mod)
    return sys.modules["_galore_torch_bench.adamw"].AdamW


def _step(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    c, w0, grad, p, q = inp.case, inp.w0, inp.g, inp.p, inp.q
    w = torch.nn.Parameter(w0.clone())
    group = {"params": [w], "rank": c.rank, "update_proj_gap": 10**9, "scale": SCALE, "proj_type": "std"}
    hyper = dict(lr=inp.lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    if name in ("eager", common.COMPILED):
        m, v = inp.m0.clone(), inp.v0.clone()
        fn = eager_step if name == "eager" else common.compiled(eager_step, opts)
        state, step = {"exp_avg": m, "exp_avg_sq": v}, lambda: fn(w.data, grad, p, q, m, v, inp.alpha, *BETAS, EPS)
    elif name == "galore_torch":
        adamw = load_galore_torch()
        if adamw is None:
            raise Unavailable("galore-torch is not installed")
        w.grad = grad
        opt = adamw([group], no_deprecation_warning=True, **hyper)
        opt.step()  # creates the projector (an SVD refresh) and the moments; the basis is replaced below
        state = opt.state[w]
        state["projector"].ortho_matrix = (p if p is not None else q).to(grad.dtype)
        state["exp_avg"], state["exp_avg_sq"] = (t.to(grad.dtype, copy=True) for t in (inp.m0, inp.v0))  # its dtype
        step = opt.step
    elif common.is_fastpeft(name):
        from fastpeft.optim import GaLoreAdamW

        if name == "fastpeft[cublas]":
            raise Unavailable("GaLoreAdamW's step has no cuBLAS path (the cublas backend is the layer's backward)")

        w.grad = grad
        opt = GaLoreAdamW([group], backend=common.fastpeft_backend(name, inp.device), **hyper)
        state = opt.state[w]
        state.update(step=1, exp_avg=inp.m0.clone(), exp_avg_sq=inp.v0.clone())
        state.update({k: t for k, t in (("proj_p", p), ("proj_q", q)) if t is not None})
        step = opt.step
    else:
        raise common.unknown_impl(name, families(c), has_cublas=HAS_CUBLAS)

    def run():  # from the same state every time: W, moments and the step count (t = 1 before, 2 after)
        with torch.no_grad():
            w.copy_(w0)
            state["exp_avg"].copy_(inp.m0)
            state["exp_avg_sq"].copy_(inp.v0)
        if "step" in state:
            state["step"] = 1
        step()
        return {"dw": w.detach().to(torch.float64) - w0.to(torch.float64), "exp_avg": state["exp_avg"],
                "exp_avg_sq": state["exp_avg_sq"]}

    return common.Impl(name, "step", run, {"step": lambda: (step, None)}, [w, grad])


def _refresh(name: str, inp: Inputs) -> common.Impl:
    from fastpeft.optim import projector as pj

    c, x, dy = inp.case, inp.x, inp.dy
    if name == "svd":
        gm = (dy.t() @ x).float()  # galore-torch refreshes from the full gradient it already holds

        def find():
            u, _, vh = torch.linalg.svd(gm, full_matrices=False)
            return (u[:, :c.rank].to(x.dtype), None) if c.side == "left" else (None, vh[:c.rank].to(x.dtype))
    elif name == RANDOMIZED:
        gen = torch.Generator(device=x.device).manual_seed(0)

        def find():
            return pj.randomized_basis_factored(x, dy, c.rank, c.side, oversample=OVERSAMPLE,
                                                power_iters=POWER_ITERS, generator=gen)
    else:
        raise common.unknown_impl(name, families(c), has_cublas=HAS_CUBLAS)
    return common.Impl(name, "refresh", lambda: {"energy": _energy(inp, *find())}, {"refresh": lambda: (find, None)},
                       [x, dy])


def build(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    kind = inp.case.kind
    family = "fastpeft" if name.startswith("fastpeft[") and name != RANDOMIZED else name
    if family not in KIND_IMPLS[kind]:
        raise ValueError(f"impl {name!r}: not a {kind} implementation (expected one of "
                         f"{opspec.expand(families(inp.case))})")
    if kind == "layer":
        return _layer(name, inp)
    return _step(name, inp, opts) if kind == "step" else _refresh(name, inp)


__all__ = ["NAME", "METRICS", "FLOOR", "IMPLS", "DESCRIPTIONS", "Case", "Inputs", "headline", "cases", "families",
           "make_inputs", "reference", "build", "work", "main_metric", "bytes_needed", "eager_step",
           "load_galore_torch", "HAS_CUBLAS"]
