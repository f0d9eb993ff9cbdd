"""Many LoRA adapters over one frozen W0: each token (or sequence) with its own adapter in one batch.

Implementations, all on the same W0, adapter pool (A [R_total, in], B [out, R_total], non-zero), ids and
dY of a case:
  floor            the frozen F.linear alone (no adapter): what the adapters would cost if they were free
  single           fastpeft.lora_linear with ONE adapter (number 0) for the whole batch: the issue's 1.25x
                   target compares the mixed batch with it (checked against its own reference)
  loop             a Python loop of fastpeft.lora_linear, one call per adapter on its rows
  eager            plain PyTorch: base GEMM, then per adapter index_select, two skinny GEMMs, index_add
  compiled         torch.compile of eager
  peft             HF PEFT's mixed batch, model(x, adapter_names=[one per sequence]): inference only
  fastpeft[<b>]    fastpeft.multi_lora_linear with backend b (W0 read once for the mixed batch; cublas: cuBLAS
                   GEMMs with the per-token low-rank term as their C input)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import common
from .common import BuildOptions, Unavailable

NAME = "multi-lora"
FLOOR = "floor"
HAS_CUBLAS = True
HAS_AUTO = True  # backend="auto" measures the backends per shape bucket on CUDA
IMPLS = ("floor", "single", "loop", "eager", common.COMPILED, "peft", "fastpeft")
DESCRIPTIONS = {
    "floor": "frozen F.linear alone (the floor)",
    "single": "fastpeft.lora_linear with one adapter for the whole batch",
    "loop": "a Python loop of fastpeft.lora_linear, one call per adapter",
    "eager": "PyTorch: base GEMM + per adapter index_select, x@A^T@B^T, index_add",
    common.COMPILED: common.COMPILED_DESCRIPTION,
    "peft": "HF PEFT mixed batch (adapter_names), inference only",
    "fastpeft[torch]": "fastpeft.multi_lora_linear, PyTorch backend",
    "fastpeft[triton]": "fastpeft.multi_lora_linear, Triton kernels",
    "fastpeft[cublas]": "fastpeft.multi_lora_linear, cuBLAS addmm with the per-token low-rank term as C (Triton kernels)",
    "fastpeft[auto]": "fastpeft.multi_lora_linear, backend='auto': each pass on the backend it measured fastest here",
}


@dataclass(frozen=True)
class Case(common.CaseMixin):
    m: int  # tokens
    seqs: int  # sequences; tokens per sequence = m // seqs
    adapters: int
    r: int  # rank of every adapter, or the base of the mixed ranks r/2, r, 2r, 4r
    in_features: int = 4096
    out_features: int = 4096
    mixed_ranks: bool = False
    per_token: bool = False  # random per-token ids instead of one id per sequence
    dtype: str = "bf16"
    tags: tuple = field(default=(), compare=False)

    @property
    def ranks(self) -> tuple:
        if not self.mixed_ranks:
            return (self.r,) * self.adapters
        cycle = (max(1, self.r // 2), self.r, 2 * self.r, 4 * self.r)
        return tuple(cycle[i % 4] for i in range(self.adapters))

    @property
    def label(self) -> str:
        rk = f"r{min(self.ranks)}-{max(self.ranks)}" if self.mixed_ranks else f"r{self.r}"
        order = "per-token" if self.per_token else f"{self.seqs}seq"
        return f"M={self.m} {order} {self.adapters}ad {rk} {self.in_features}x{self.out_features} {self.dtype}"

    def scalings(self) -> list[float]:
        return [32.0 / r for r in self.ranks]  # alpha = 32


def headline(preset: str) -> Case:
    if preset == "cpu":
        return Case(256, 16, 8, 8, 512, 512, dtype="fp32", tags=("headline",))
    if preset == "smoke":
        return Case(12, 6, 3, 2, 40, 24, mixed_ranks=True, dtype="fp32", tags=("headline",))
    return Case(8192, 64, 64, 16, tags=("headline",))


def cases(preset: str) -> list[Case]:
    h = headline(preset)
    dec = dataclasses.replace(h, m=h.seqs, tags=("decode", "headline"))  # one token per sequence
    if preset in ("smoke", "cpu"):
        return [h, dec]
    mixed = dataclasses.replace(h, mixed_ranks=True, tags=("axis:ranks",))
    if preset == "quick":
        return [h, dec, mixed]
    return common.dedupe([h, dec, mixed, dataclasses.replace(dec, mixed_ranks=True, tags=("decode",)),
                          Case(1, 1, 1, 16, tags=("decode",)), Case(512, 8, 8, 16, tags=("axis:m",)),
                          *common.around(h, {"adapters": (1, 8, 32)})[1:],
                          dataclasses.replace(h, per_token=True, tags=("per-token",))])


def _tokens_per_adapter(case: Case) -> list[float]:
    if case.per_token:
        return [case.m / case.adapters] * case.adapters  # expected counts of the random ids
    per_seq = case.m // case.seqs
    return [per_seq * len(range(i, case.seqs, case.adapters)) for i in range(case.adapters)]


def tiny(case: Case) -> Case:
    """The case at tiny sizes (2 tokens, 16x16, r=2): its time per call is host overhead."""
    return dataclasses.replace(case, m=2, seqs=min(case.seqs, 2), r=2, in_features=16, out_features=16, tags=())


def work(case: Case) -> dict:
    """Necessary FLOPs and bytes: W0 and x read once, each used adapter read once, y written once."""
    e, m, k, n = case.torch_dtype.itemsize, case.m, case.in_features, case.out_features
    toks = _tokens_per_adapter(case)
    rt = sum(t * r for t, r in zip(toks, case.ranks))
    used = sum(r for t, r in zip(case.ranks, toks) if t > 0) * (k + n)
    fwd = (2.0 * m * k * n + 2.0 * rt * (k + n), e * (m * k + k * n + m * n + used) + 8 * m)
    bwd = (2.0 * m * k * n + 4.0 * rt * (k + n), e * (m * n + k * n + 2 * m * k + 2 * used) + 8 * m)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1]), "infer": fwd}


def bytes_needed(case: Case) -> int:
    md, w = case.m * max(case.in_features, case.out_features), case.in_features * case.out_features
    return case.torch_dtype.itemsize * (10 * md + w) + 8 * (5 * md + w)


@dataclass
class Inputs:
    case: Case
    x: torch.Tensor  # [M, in], requires grad
    weight: torch.Tensor  # W0 [out, in], frozen
    lora_a: torch.Tensor  # pool [R_total, in], trainable
    lora_b: torch.Tensor  # pool [out, R_total], trainable, non-zero
    ids: torch.Tensor  # [M] int64, adapter per token
    rows: list  # per adapter, the row indices of its tokens (host-side grouping, once)
    dy: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device

    def slices(self):
        """(offset, rank, scaling) per adapter in the packed pool."""
        off = 0
        for r, s in zip(self.case.ranks, self.case.scalings()):
            yield off, r, s
            off += r


def make_inputs(case: Case, device, seed: int = 0) -> Inputs:
    if case.m % case.seqs:
        raise ValueError(f"case {case.label}: m={case.m} is not a multiple of seqs={case.seqs}")
    g = common.generator(device, seed)
    dt, k, n, rt = case.torch_dtype, case.in_features, case.out_features, sum(case.ranks)
    x = common.randn((case.m, k), g, dt).requires_grad_(True)
    w = common.uniform((n, k), g, dt, 1 / math.sqrt(k))
    a = common.uniform((rt, k), g, dt, 1 / math.sqrt(k)).requires_grad_(True)
    b = common.randn((n, rt), g, dt, 1 / math.sqrt(max(case.ranks))).requires_grad_(True)
    if case.per_token:
        ids = torch.randint(0, case.adapters, (case.m,), device=device, generator=g)
    else:
        ids = (torch.arange(case.seqs, device=device) % case.adapters).repeat_interleave(case.m // case.seqs)
    rows = [(ids == i).nonzero().flatten() for i in range(case.adapters)]
    return Inputs(case, x, w, a, b, ids, rows, common.randn((case.m, n), g, dt))


def _eager(x, w, a, b, inp: Inputs):
    y = F.linear(x, w)
    for rows, (off, r, s) in zip(inp.rows, inp.slices()):
        t = F.linear(F.linear(x.index_select(0, rows), a[off:off + r]), b[:, off:off + r])
        y = y.index_add(0, rows, t, alpha=s)
    return y


def reference(inp: Inputs, kind: str) -> dict:
    """By float64 autograd: "base" y, dX; "multi" y, dX, d(pool A), d(pool B); "single" adapter 0 for every
    token: y, dX, dA0, dB0."""
    x = inp.x.detach().to(torch.float64).requires_grad_(True)
    w = inp.weight.detach().to(torch.float64)
    out = {}
    if kind == "base":
        y = F.linear(x, w)
    elif kind == "multi":
        a, b = (t.detach().to(torch.float64).requires_grad_(True) for t in (inp.lora_a, inp.lora_b))
        y = _eager(x, w, a, b, inp)
    else:
        r, s = inp.case.ranks[0], inp.case.scalings()[0]
        a, b = (t.detach().to(torch.float64).requires_grad_(True) for t in (inp.lora_a[:r], inp.lora_b[:, :r]))
        y = F.linear(x, w) + s * F.linear(F.linear(x, a), b)
    y.backward(inp.dy.to(torch.float64))
    out.update(y=y.detach(), dx=x.grad)
    if kind != "base":
        out.update(da=a.grad, db=b.grad)
    return out


class EagerMulti(torch.nn.Module):
    def __init__(self, inp: Inputs):
        super().__init__()
        self.inp = inp

    def forward(self, x):
        i = self.inp
        return _eager(x, i.weight, i.lora_a, i.lora_b, i)


def _copies(inp: Inputs):
    """Per adapter, its own trainable A and B (what a loop over single-adapter layers holds)."""
    return [(inp.lora_a[o:o + r].detach().clone().requires_grad_(True),
             inp.lora_b[:, o:o + r].detach().clone().requires_grad_(True)) for o, r, _ in inp.slices()]


def _loop(inp: Inputs, opts):
    from fastpeft import lora_linear

    params = _copies(inp)
    order = torch.argsort(torch.cat(inp.rows))

    def fwd(x):
        ys = [lora_linear(x.index_select(0, rows), inp.weight, a, b, s)
              for rows, (a, b), (_, _, s) in zip(inp.rows, params, inp.slices())]
        return torch.cat(ys).index_select(0, order)

    def post():  # the pool's gradients, as the other implementations give them (zeros for unused adapters)
        da = [a.grad if a.grad is not None else torch.zeros_like(a) for a, _ in params]
        db = [b.grad if b.grad is not None else torch.zeros_like(b) for _, b in params]
        return {"da": torch.cat(da), "db": torch.cat(db, dim=1)}

    leaves = {f"_{i}{k}": t for i, p in enumerate(params) for k, t in zip("ab", p)}
    impl = common.layer_impl("loop", "multi", fwd, inp.x, inp.dy, {"dx": inp.x, **leaves}, post=post,
                             inputs=[inp.weight])
    run = impl.run
    impl.run = lambda: {k: v for k, v in run().items() if not k.startswith("_")}
    return impl


def _peft(inp: Inputs):
    c = inp.case
    if c.per_token:
        raise Unavailable("PEFT's adapter_names are per sequence, not per token")
    try:
        import peft
    except Exception as exc:
        raise Unavailable(f"peft does not import ({type(exc).__name__}: {exc})") from None
    from .lora import _OneLinear

    base = torch.nn.Linear(c.in_features, c.out_features, bias=False, device="meta")
    base.weight = torch.nn.Parameter(inp.weight, requires_grad=False)
    model = None
    for i, (o, r, s) in enumerate(inp.slices()):
        cfg = peft.LoraConfig(r=r, lora_alpha=s * r, target_modules=["proj"])
        if model is None:
            model = peft.get_peft_model(_OneLinear(base), cfg, adapter_name=f"a{i}",
                                        autocast_adapter_dtype=False)
        else:
            model.add_adapter(f"a{i}", cfg)
        layer = model.base_model.model.proj
        layer.lora_A[f"a{i}"].weight.data = inp.lora_a[o:o + r].detach().clone()
        layer.lora_B[f"a{i}"].weight.data = inp.lora_b[:, o:o + r].detach().clone()
    model.eval()
    seq = c.m // c.seqs
    names = [f"a{int(i)}" for i in inp.ids[::seq].tolist()]
    fwd = lambda x: model(x.view(c.seqs, seq, -1), adapter_names=names).view(c.m, -1)  # noqa: E731
    return common.layer_impl("peft", "multi", fwd, inp.x, inp.dy, {}, train=False, notes="inference only")


def build(name: str, inp: Inputs, opts: BuildOptions) -> common.Impl:
    if name == "floor":
        return common.layer_impl(name, "base", lambda x: F.linear(x, inp.weight), inp.x, inp.dy, {"dx": inp.x},
                                 inputs=[inp.weight])
    if name == "single":
        from fastpeft import lora_linear

        (a, b), s = _copies(inp)[0], inp.case.scalings()[0]
        return common.layer_impl(name, "single", lambda x: lora_linear(x, inp.weight, a, b, s), inp.x, inp.dy,
                                 {"dx": inp.x, "da": a, "db": b}, inputs=[inp.weight])
    if name == "loop":
        return _loop(inp, opts)
    if name == "peft":
        return _peft(inp)
    if name in ("eager", common.COMPILED):
        mod = EagerMulti(inp)
        fwd = mod if name == "eager" else common.compiled(mod, opts)
    elif common.is_fastpeft(name):
        from fastpeft import multi_lora_linear

        backend = common.fastpeft_backend(name, inp.device, has_cublas=HAS_CUBLAS, has_auto=HAS_AUTO)
        c, ids = inp.case, inp.ids

        def fwd(x):  # ids are valid by construction: serving skips the check's device sync
            return multi_lora_linear(x, inp.weight, inp.lora_a, inp.lora_b, ids, c.scalings(), list(c.ranks),
                                     check_ids=False, backend=backend)
    else:
        raise common.unknown_impl(name, IMPLS, has_cublas=HAS_CUBLAS, has_auto=HAS_AUTO)
    return common.layer_impl(name, "multi", fwd, inp.x, inp.dy, {"dx": inp.x, "da": inp.lora_a, "db": inp.lora_b},
                             inputs=[inp.weight])


__all__ = ["NAME", "FLOOR", "HAS_CUBLAS", "IMPLS", "DESCRIPTIONS", "Case", "Inputs", "headline", "cases", "make_inputs", "reference",
           "build", "work", "tiny", "bytes_needed"]
