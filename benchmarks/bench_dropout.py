"""What dropout costs the LoRA linear (issue 13, item 5): a training step (forward + backward) at p = 0 and at
p = 0.1 with the mask regenerated from the seed (the default) and packed (dropout_mask="packed"), and the mask
alone.

    python benchmarks/bench_dropout.py [--preset quick|cpu|smoke] [--shape M,IN,OUT,R] [--dtype bf16|fp16|fp32]
                                       [--backend triton|cublas|torch] [--json PATH]

CUDA (preset quick, the default there; backend triton): the step through fastpeft.LoRALinear, and the mask alone
as kernels/philox.py `dropout_count` (the [M, IN] mask drawn and reduced to a count: no operand is read), in ns per
element and as "GB/s-equivalent", M·IN·e / time: the bandwidth at which a pass reading x would take as long as
drawing its mask. Next to it a copy of x (GB/s measured), so mask / read-of-x says whether a pass that draws the
mask while it streams x (shrink, dA) is bound by Philox or by memory.
CPU (preset cpu, the default without CUDA; backend torch: the C++ kernels of csrc/cpu/): the step, and the mask
alone as the C++ dropout pass (mask and scale: x read, the result written) minus the same pass without a mask
(x * scale). One thread; under a minute.

Prediction, H200 (132 SMs at ~1.98 GHz, ~4.8 TB/s HBM3e, ~4.0-4.3 TB/s achievable), bf16, M = 8192, 4096 x 4096,
r = 16; the GPU measurement is owed:
  Philox4x32-10 per counter (4 elements): 10 rounds of 2 32x32->64 multiplies (IMAD.WIDE, or mul.hi + mul.lo) and
  2 three-input XORs (LOP3; the key schedule is scalar, kernels/philox.py), the first round partly constant; then
  per element a shift, a compare and a select: ~60 integer instructions per 4 elements, ~15 per element, of which
  ~5 on the half-rate multiply pipe. At ~64 IMAD/clk/SM (IMAD.WIDE two passes) that is ~0.15 clk per element per
  SM: 132 x 1.98e9 / 0.15 ~ 1.7e12 elements/s, ~0.6 ps per element, ~19 us for the [8192, 4096] mask: ~3.5 TB/s
  equivalent at 2 bytes per element, about the time of one read of x (64 MiB: ~16 us at 4.1 TB/s).
  The mask is drawn three times per step: shrink (streams x: Philox and the read of x overlap only partly, so
  +5..19 us), the dX GEMM (the [M, IN] output's mask before its K loop, with tensor cores busy on other tiles:
  ~19 us of integer work against ~350 us of MMA at ~780 TFLOP/s for 2·M·N·K = 275 GFLOP, <= 5%), and dA (like the
  shrink). Predicted step cost of p = 0.1 over p = 0: +25..55 us on a ~0.9 ms step (3..6%). The dropout GEMM config
  also narrows Hopper's tile to 128x128 (the Philox words beside a 128x256 accumulator spill), which may cost more
  than the Philox itself.
  Packed: the forward writes M·IN/8 = 4 MiB and the backward reads it twice (12 MiB: ~3 us) and unpacks it
  (~3 instructions per element, ~1/5 of Philox), saving the two backward draws: predicted -25..35 us per step
  against regenerate, for 4 MiB per layer held from forward to backward. Measure before switching the default.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

PRESETS = {  # shape (M, IN, OUT, R), dtype, backend, timing (fastpeft.bench.timing.time_fn keywords)
    "quick": dict(shape=(8192, 4096, 4096, 16), dtype="bf16", backend="triton",
                  timing=dict(warmup_ms=10, rep_ms=40, min_reps=10, max_reps=200)),
    "cpu": dict(shape=(2048, 1024, 1024, 16), dtype="fp32", backend="torch",
                timing=dict(warmup_ms=2, rep_ms=15, min_reps=5, max_reps=50)),
    "smoke": dict(shape=(33, 40, 24, 4), dtype="fp32", backend="torch",
                  timing=dict(warmup_ms=0, rep_ms=1, min_reps=2, max_reps=3)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
P, SEED = 0.1, 1234


def _step_ms(device, shape, dtype, backend, p, mode, timing):
    """Median ms of one forward + backward of fastpeft.LoRALinear (dX, dA, dB) at dropout p, dropout_mask=mode."""
    import fastpeft
    from fastpeft.bench.timing import time_fn

    m, k, n, r = shape
    g = torch.Generator(device=device).manual_seed(0)
    base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    layer = fastpeft.LoRALinear(base, r=r, alpha=2 * r, dropout=p, backend=backend, dropout_mask=mode).train()
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype, generator=g)
    return time_fn(lambda: layer(x).backward(dy), device, **timing).median_ms


def _mask_ms(device, m, k, dtype, timing):
    """(ms of the mask alone, what was timed)."""
    from fastpeft.bench.timing import time_fn
    from fastpeft.dropout import keep_threshold

    thr = keep_threshold(P)
    if device.type == "cuda":
        from fastpeft.kernels.philox import dropout_count

        return time_fn(lambda: dropout_count(m, k, SEED, thr, device), device, **timing).median_ms, "triton dropout_count"
    from fastpeft import _ext_cpu

    ext = _ext_cpu.get()
    x = torch.randn(m, k, dtype=dtype)
    if ext is None:  # no C++ extension: the PyTorch twin's mask
        from fastpeft.dropout import dropout_keep_mask

        return time_fn(lambda: dropout_keep_mask(SEED, m, k, P), device, **timing).median_ms, "PyTorch twin"
    scale = 1.0 / (1.0 - P)
    with_mask = time_fn(lambda: ext.dropped(x, SEED, thr, scale), device, **timing).median_ms
    without = time_fn(lambda: x * scale, device, **timing).median_ms
    return max(with_mask - without, 0.0), "C++ dropped(x) - x*scale"


def _copy_gbs(device, m, k, dtype, timing):
    from fastpeft.bench.timing import time_fn

    x = torch.randn(m, k, device=device, dtype=torch.float32).to(dtype)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / (time_fn(lambda: y.copy_(x), device, **timing).median_ms * 1e6)


def run(preset: str, shape=None, dtype=None, backend=None) -> dict:
    spec = PRESETS[preset]
    device = torch.device("cuda" if torch.cuda.is_available() and preset == "quick" else "cpu")
    shape = tuple(shape or spec["shape"])
    dtype_name = dtype or spec["dtype"]
    dt, backend, timing = DTYPES[dtype_name], backend or spec["backend"], spec["timing"]
    if device.type == "cpu":
        torch.set_num_threads(1)
    m, k, n, r = shape
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "preset": preset,
           "shape": dict(M=m, IN=k, OUT=n, R=r), "dtype": dtype_name, "backend": backend, "p": P}
    step = {"p=0": _step_ms(device, shape, dt, backend, 0.0, "regenerate", timing),
            "p=0.1 regenerate": _step_ms(device, shape, dt, backend, P, "regenerate", timing),
            "p=0.1 packed": _step_ms(device, shape, dt, backend, P, "packed", timing)}
    mask_ms, how = _mask_ms(device, m, k, dt, timing)
    e = torch.empty((), dtype=dt).element_size()
    copy = _copy_gbs(device, m, k, dt, timing)
    out.update(step_ms=step, dropout_overhead_pct={key: 100 * (v / step["p=0"] - 1) for key, v in step.items()},
               mask={"ms": mask_ms, "timed": how, "ns_per_element": mask_ms * 1e6 / (m * k),
                     "GB/s_equivalent": m * k * e / (mask_ms * 1e6) if mask_ms > 0 else float("inf"),
                     "x_copy_GB/s": copy, "mask_over_read_of_x": mask_ms / (m * k * e / (copy * 1e6))},
               packed_mask_bytes=m * ((k + 7) // 8))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", help="M,IN,OUT,R")
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--backend", choices=("triton", "cublas", "torch"))
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else None
    res = run(args.preset, shape, args.dtype, args.backend)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
