"""Fused bottleneck adapter vs the naive PyTorch adapter: fwd, bwd, fwd+bwd times, achieved GB/s for the bytes
the op must move, and that as a fraction of the device's measured copy bandwidth.

    python benchmarks/bench_adapter.py            # CUDA: the issue's grid, bf16; CPU: one small case
    python benchmarks/bench_adapter.py --out benchmarks/results/adapter.json

Bytes counted (the floor of the op, not what either implementation happens to move): forward reads h and
writes y once ([M, d] each) and writes Z [M, a] fp32; backward reads dY and h once, writes dh once, and
reads Z; both read the weights once. Series adapter, gelu, biases on.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpeft  # noqa: E402,F401
from fastpeft.ops.adapter import bottleneck_adapter  # noqa: E402


def naive(h, wd, bd, wu, bu, s):
    return h + s * F.linear(F.gelu(F.linear(h, wd, bd)), wu, bu)


def fused(h, wd, bd, wu, bu, s, backend):
    return bottleneck_adapter(h, wd, bd, wu, bu, s, "gelu", backend=backend)


def timer(fn, reps):
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50) * 1e-3
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def copy_bandwidth(device):
    n = (1 << 28) if device == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), 5)
    return 2 * n / t


def bench_case(M, d, a, dtype, device, backend, reps):
    e = torch.tensor([], dtype=dtype).element_size()
    h = torch.randn(M, d, device=device, dtype=dtype, requires_grad=True)
    wd = (torch.randn(a, d, device=device, dtype=dtype) * d ** -0.5).requires_grad_()
    wu = (torch.randn(d, a, device=device, dtype=dtype) * a ** -0.5).requires_grad_()
    bd = torch.zeros(a, device=device, dtype=dtype, requires_grad=True)
    bu = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, d, device=device, dtype=dtype)
    leaves = [h, wd, bd, wu, bu]
    w_bytes = 2 * d * a * e + (a + d) * e
    bytes_fwd = 2 * M * d * e + M * a * 4 + w_bytes
    bytes_bwd = 3 * M * d * e + M * a * 4 + 2 * w_bytes
    out = {}
    for name, f in (("naive", lambda: naive(*leaves, 1.0)), ("fastpeft", lambda: fused(*leaves, 1.0, backend))):
        with torch.no_grad():
            t_f = timer(f, reps)
        y = f()
        t_b = timer(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), reps)
        t_fb = timer(lambda: torch.autograd.grad(f(), leaves, dy), reps)
        out[name] = {"fwd_s": t_f, "bwd_s": t_b, "fwd_bwd_s": t_fb,
                     "fwd_GBps": bytes_fwd / t_f / 1e9, "bwd_GBps": bytes_bwd / t_b / 1e9,
                     "fwd_bwd_GBps": (bytes_fwd + bytes_bwd) / t_fb / 1e9}
    return {"M": M, "d": d, "a": a, "dtype": str(dtype), "bytes_fwd": bytes_fwd, "bytes_bwd": bytes_bwd, **out,
            "speedup_fwd_bwd": out["naive"]["fwd_bwd_s"] / out["fastpeft"]["fwd_bwd_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if torch.cuda.is_available():
        device, backend, reps = "cuda", "triton", 0
        grid = list(itertools.product((1, 2048, 16384), (768, 4096, 8192), (16, 64, 256)))
        dtype = getattr(torch, args.dtype)
    else:  # the interpreter: a correctness-sized smoke run, its times mean nothing
        device, backend, reps = "cpu", "triton", 1
        grid = [(64, 96, 16)]
        dtype = torch.float32
    copy_bw = copy_bandwidth(device)
    rows = []
    for M, d, a in grid:
        r = bench_case(M, d, a, dtype, device, backend, reps)
        for impl in ("naive", "fastpeft"):
            r[impl]["fwd_bwd_frac_copy"] = r[impl]["fwd_bwd_GBps"] * 1e9 / copy_bw
        rows.append(r)
        f, n = r["fastpeft"], r["naive"]
        print(f"M={M:6d} d={d:5d} a={a:4d}  fwd {f['fwd_s']*1e6:9.1f}us ({n['fwd_s']*1e6:9.1f})  "
              f"bwd {f['bwd_s']*1e6:9.1f}us ({n['bwd_s']*1e6:9.1f})  fwd+bwd {f['fwd_bwd_s']*1e6:9.1f}us "
              f"({n['fwd_bwd_s']*1e6:9.1f})  {f['fwd_bwd_GBps']:7.1f} GB/s = {f['fwd_bwd_frac_copy']:.0%} of copy  "
              f"x{r['speedup_fwd_bwd']:.2f}", flush=True)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
              "copy_GBps": copy_bw / 1e9, "torch": torch.__version__, "cases": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
