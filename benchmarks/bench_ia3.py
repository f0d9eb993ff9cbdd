"""IA3 on a frozen linear vs the plain frozen linear (cuBLAS via F.linear): fwd and fwd+bwd (dX; and dl for
IA3) times and IA3's overhead in percent. The issue's target: IA3 adds <= 3% to the frozen linear's time.

    python benchmarks/bench_ia3.py [--out benchmarks/results/ia3.json]
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
from fastpeft.ops.ia3 import ia3_linear  # noqa: E402


def timer(fn, reps):
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50) * 1e-3
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_case(M, K, N, mode, dtype, device, reps):
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
    b = torch.zeros(N, device=device, dtype=dtype)
    l = torch.ones(N if mode == "output" else K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    plain = lambda: F.linear(x, w, b)  # noqa: E731
    ia3 = lambda: ia3_linear(x, w, b, l, mode, backend="triton")  # noqa: E731
    res = {}
    for name, f, leaves in (("linear", plain, [x]), ("ia3", ia3, [x, l])):
        with torch.no_grad():
            t_f = timer(f, reps)
        t_fb = timer(lambda: torch.autograd.grad(f(), leaves, dy), reps)
        res[name] = {"fwd_s": t_f, "fwd_bwd_s": t_fb}
    return {"M": M, "K": K, "N": N, "mode": mode, "dtype": str(dtype), **res,
            "overhead_fwd": res["ia3"]["fwd_s"] / res["linear"]["fwd_s"] - 1,
            "overhead_fwd_bwd": res["ia3"]["fwd_bwd_s"] / res["linear"]["fwd_bwd_s"] - 1}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if torch.cuda.is_available():
        device, dtype, reps = "cuda", torch.bfloat16, 0
        grid = list(itertools.product((1, 2048, 16384), ((4096, 4096), (4096, 11008)), ("output", "input")))
    else:  # the interpreter: a smoke run, its times mean nothing
        device, dtype, reps = "cpu", torch.float32, 1
        grid = [(32, (48, 40), "output"), (32, (48, 40), "input")]
    rows = []
    for M, (K, N), mode in grid:
        r = bench_case(M, K, N, mode, dtype, device, reps)
        rows.append(r)
        print(f"M={M:6d} K={K:5d} N={N:5d} {mode:6s}  fwd {r['ia3']['fwd_s']*1e6:9.1f}us "
              f"(linear {r['linear']['fwd_s']*1e6:9.1f})  fwd+bwd {r['ia3']['fwd_bwd_s']*1e6:9.1f}us "
              f"(linear {r['linear']['fwd_bwd_s']*1e6:9.1f})  overhead {r['overhead_fwd_bwd']:+.1%}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                       "cases": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
