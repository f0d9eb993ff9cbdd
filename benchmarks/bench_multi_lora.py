"""pytest-benchmark suite of the multi-adapter LoRA linear (issue 7): many adapters over one shared W0.

    pytest benchmarks/bench_multi_lora.py --benchmark-only          # pytest-benchmark tables
    python benchmarks/bench_multi_lora.py                            # one table with the issue's target ratios

Implementations, all on the same W0 [out, in], pool and tokens of a case:
  multi      fastpeft.MultiLoRALinear (W0 read once for the mixed batch)
  loop       a Python loop of fastpeft.lora_linear, one call per adapter on its tokens (+ the base-only rows)
  peft       HF PEFT's mixed-batch path, model(x, adapter_names=[one per sequence]) (inference only), when peft imports
  single     fastpeft.lora_linear with ONE adapter for the whole batch: the reference of the 1.25x target
Cases (CUDA, bf16, 4096x4096): tokens 1..8192 in sequences, 1 to 64 distinct adapters of rank 16 and mixed
ranks 8..64, per-sequence ids (and per-token random ids at M=8192, the adversarial order). On the CPU one tiny
fp32 case runs the PyTorch backend, so the suite is exercised without a GPU; its times say nothing about GPUs.
Every implementation's forward is checked against the loop before it is timed.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import pytest
import torch

import fastpeft  # noqa: F401
from fastpeft.bench import harness
from fastpeft.modules.multi_lora import MultiLoRALinear
from fastpeft.ops.lora_linear import lora_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Case:
    m: int  # tokens
    seqs: int  # sequences (ids per sequence); tokens per sequence = m // seqs
    adapters: int  # distinct adapters used in the batch
    ranks: tuple  # rank per adapter
    d: int = 4096
    dtype: str = "bf16"
    per_token: bool = False  # random per-token ids instead of per-sequence

    @property
    def label(self) -> str:
        rk = f"r{self.ranks[0]}" if len(set(self.ranks)) == 1 else f"r{min(self.ranks)}-{max(self.ranks)}"
        order = "per-token" if self.per_token else f"{self.seqs}seq"
        return f"M={self.m} {order} {self.adapters}ad {rk} {self.d}x{self.d} {self.dtype}"

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


def _mixed(n):
    return tuple((8, 16, 32, 64)[i % 4] for i in range(n))


if DEVICE.type == "cuda":
    CASES = [Case(1, 1, 1, (16,)), Case(64, 64, 64, (16,) * 64), Case(64, 64, 64, _mixed(64)),
             Case(512, 8, 8, (16,) * 8), Case(8192, 64, 1, (16,)), Case(8192, 64, 8, (16,) * 8),
             Case(8192, 64, 32, (16,) * 32), Case(8192, 64, 64, (16,) * 64), Case(8192, 64, 64, _mixed(64)),
             Case(8192, 64, 64, (16,) * 64, per_token=True)]
    ROUNDS, WARMUP = 50, 5
else:
    CASES = [Case(64, 8, 4, (4, 8, 16, 8), d=256, dtype="fp32")]
    ROUNDS, WARMUP = 5, 1
IMPLS = ("multi", "loop", "peft", "single")
METRICS = ("infer", "fwd_bwd")


class Inputs:
    def __init__(self, case: Case, seed: int = 0):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        dt, d = case.torch_dtype, case.d
        kw = dict(device=DEVICE, generator=g)
        self.case = case
        self.base = torch.nn.Linear(d, d, bias=False, device=DEVICE, dtype=dt).requires_grad_(False)
        self.x = torch.randn(case.m, d, **kw).to(dt)
        self.dy = torch.randn(case.m, d, **kw).to(dt)
        self.a = [(torch.rand(r, d, **kw) * 2 - 1).mul_(1 / math.sqrt(d)).to(dt) for r in case.ranks]
        self.b = [(torch.randn(d, r, **kw) / math.sqrt(r)).to(dt) for r in case.ranks]
        self.scaling = [2.0 * 16 / r for r in case.ranks]
        if case.per_token:
            self.ids = torch.randint(0, case.adapters, (case.m,), device=DEVICE, generator=g)
        else:
            seq_ids = torch.arange(case.seqs, device=DEVICE) % case.adapters
            self.ids = seq_ids.repeat_interleave(case.m // case.seqs)


@functools.lru_cache(maxsize=None)
def inputs(case: Case) -> Inputs:
    return Inputs(case)


class Unavailable(Exception):
    pass


def build(name: str, inp: Inputs):
    """(forward(x) -> y, trainable tensors) of one implementation."""
    case, dt = inp.case, inp.case.torch_dtype
    if name == "multi":
        pool = MultiLoRALinear(inp.base, case.adapters, r=max(case.ranks), init_adapters=False)
        for i, (a, b, s) in enumerate(zip(inp.a, inp.b, inp.scaling)):
            pool.load_adapter(i, a, b, scaling=s)
        pool.check_ids = False  # ids are valid by construction; serving skips the sync
        return (lambda x: pool(x, inp.ids)), [pool.lora_A, pool.lora_B]
    if name == "single":
        a, b = inp.a[0].clone().requires_grad_(True), inp.b[0].clone().requires_grad_(True)
        return (lambda x: lora_linear(x, inp.base.weight, a, b, inp.scaling[0])), [a, b]
    if name == "loop":
        params = [(a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for a, b in zip(inp.a, inp.b)]
        rows = [(inp.ids == i).nonzero().flatten() for i in range(case.adapters)]  # host-side grouping, once

        def fwd(x):
            ys = [lora_linear(x[r], inp.base.weight, a, b, s) for r, (a, b), s in zip(rows, params, inp.scaling)]
            return torch.cat(ys).index_select(0, torch.argsort(torch.cat(rows)))

        return fwd, [t for p in params for t in p]
    if name == "peft":
        try:
            import peft
        except ImportError as exc:
            raise Unavailable(f"peft does not import ({exc})")

        class One(torch.nn.Module):
            def __init__(self, lin):
                super().__init__()
                self.proj = lin

            def forward(self, x):
                return self.proj(x)

        import copy

        model = None
        for i, (a, b, s) in enumerate(zip(inp.a, inp.b, inp.scaling)):
            cfg = peft.LoraConfig(r=a.shape[0], lora_alpha=s * a.shape[0], target_modules=["proj"])
            if model is None:
                model = peft.get_peft_model(One(copy.deepcopy(inp.base)), cfg, adapter_name=f"a{i}",
                                            autocast_adapter_dtype=False)
            else:
                model.add_adapter(f"a{i}", cfg)
            layer = model.base_model.model.proj
            layer.lora_A[f"a{i}"].weight.data.copy_(a)
            layer.lora_B[f"a{i}"].weight.data.copy_(b)
        model.eval()
        seq = case.m // case.seqs
        if case.per_token:
            raise Unavailable("PEFT's adapter_names are per sequence, not per token")
        names = [f"a{int(i)}" for i in inp.ids[::seq].tolist()]
        return (lambda x: model(x.view(case.seqs, seq, -1), adapter_names=names).view(case.m, -1)), []
    raise ValueError(name)


_checked: dict = {}


def check(name: str, inp: Inputs) -> None:
    """The forward matches the loop of single-adapter calls (the issue's reference) within the dtype's tolerance."""
    key = (inp.case, name)
    if key in _checked:
        return
    fwd, _ = build(name, inp)
    with torch.no_grad():
        y = fwd(inp.x).float()
        if name == "single":
            ref = inp.x.float() @ inp.base.weight.float().t() + inp.scaling[0] * (inp.x.float() @ inp.a[0].float().t()) @ inp.b[0].float().t()
        else:
            ref = build("loop", inp)[0](inp.x).float() if name != "loop" else None
    if ref is not None:
        err = ((y - ref).abs().max() / ref.pow(2).mean().sqrt()).item()
        assert err < {"fp32": 1e-2, "fp16": 2e-2, "bf16": 6e-2}[inp.case.dtype], f"{name} at {inp.case.label}: error {err}"
    _checked[key] = True


def _sync():
    harness.synchronize(DEVICE)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("impl_name", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
def test_multi_lora(benchmark, case, impl_name, metric):
    inp = inputs(case)
    if impl_name == "peft" and metric == "fwd_bwd":
        pytest.skip("PEFT's adapter_names path is inference only")
    try:
        fwd, params = build(impl_name, inp)
    except Unavailable as exc:
        pytest.skip(str(exc))
    check(impl_name, inp)
    x = inp.x.clone().requires_grad_(metric == "fwd_bwd")

    def setup():
        for p in params:
            p.grad = None
        _sync()

    if metric == "fwd_bwd":
        def target():
            fwd(x).backward(inp.dy)
            _sync()
    else:
        def target():
            with torch.no_grad():
                fwd(x)
            _sync()

    benchmark.group = f"{case.label} {metric}"
    benchmark.extra_info.update(case=case.label, impl=impl_name, metric=metric, device=str(DEVICE))
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured."""
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = harness.time_fn(lambda: dst.copy_(src), DEVICE)
    return 2 * n / (t.median_ms * 1e-3) / 1e9


def main() -> None:
    """One table: per case and implementation the median ms, and the issue's target ratios."""
    rows = []
    bw = copy_bandwidth_gbs() if DEVICE.type == "cuda" else None
    for case in CASES:
        inp = inputs(case)
        res = {}
        for name in IMPLS:
            try:
                fwd, _ = build(name, inp)
                check(name, inp)
            except Unavailable as exc:
                res[name] = f"skip ({exc})"
                continue
            with torch.no_grad():
                res[name] = harness.time_fn(lambda: fwd(inp.x), DEVICE, flush_l2=case.m <= 64).median_ms
        line = f"{case.label:45s} " + " ".join(
            f"{n}={v:.4f}ms" if isinstance(v, float) else f"{n}={v}" for n, v in res.items())
        m, s, p = res.get("multi"), res.get("single"), res.get("peft")
        if isinstance(m, float) and isinstance(s, float) and case.m >= 4096:
            line += f" | multi/single={m / s:.2f} (target <= 1.25 at 64 adapters)"
        if isinstance(m, float) and isinstance(p, float):
            line += f" | peft/multi={p / m:.1f}x (target >= 10 at 32+ adapters)"
        if bw is not None and case.m <= 64 and isinstance(m, float):
            e = case.torch_dtype.itemsize
            nbytes = e * (case.d * case.d + 2 * case.m * case.d + sum(2 * r * case.d for r in case.ranks))
            floor_ms = nbytes / (bw / 2 * 1e9) * 1e3  # read once at the copy rate (half of read+write)
            line += f" | multi/read-floor={m / floor_ms:.2f} (target <= 1.5)"
        rows.append(line)
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
