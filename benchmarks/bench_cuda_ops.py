"""Benchmarks of the CUDA ops (pytest-benchmark), each reporting achieved GB/s = bytes that must move / time,
next to the device's measured copy bandwidth (the `copy` case).

    python -m pytest benchmarks/bench_cuda_ops.py --benchmark-only --benchmark-json=benchmarks/results/cuda_ops.json

Targets (issue 6): shrink, expand, dy_reduce and bwd_da >= 80% of copy bandwidth at M=8192, in=4096, r=16;
decode <= 1.10x the time to read W0 once at copy bandwidth; rank_update faster than W.add_(B @ A, alpha=c).
Each timed call launches the op LAUNCHES times and synchronises once, so launch overhead is included
as it is in a training step but the host-device sync is amortised.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA benchmarks need a GPU (CPU-only machine)")

LAUNCHES = 20
M, IN, OUT, R = 8192, 4096, 4096, 16
DTYPE = torch.bfloat16


def _rnd(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(DTYPE)


def _bench(benchmark, fn, nbytes: int, **info):
    def run():
        for _ in range(LAUNCHES):
            fn()
        torch.cuda.synchronize()

    run()  # warm-up (and the first-call extension load)
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)
    seconds = benchmark.stats.stats.median / LAUNCHES
    benchmark.extra_info.update(info)
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["us_per_call"] = round(seconds * 1e6, 2)
    benchmark.extra_info["GB/s"] = round(nbytes / seconds / 1e9, 1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()


def _esize():
    return torch.empty((), dtype=DTYPE).element_size()


@pytest.fixture(scope="module")
def cuda_ops():
    from fastpeft import _ext
    from fastpeft.ops import cuda_ops

    _ext.load_extension()
    return cuda_ops


def test_copy_bandwidth(benchmark):
    """Device-to-device copy of 256 MiB: bytes read + written, the reference for the GB/s of the others."""
    src = torch.empty(128 << 20, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    _bench(benchmark, lambda: dst.copy_(src), 2 * src.numel() * src.element_size(), op="copy")


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_shrink(benchmark, cuda_ops, p):
    x, a = _rnd(M, IN), _rnd(R, IN, scale=0.02)
    e = _esize()
    _bench(benchmark, lambda: cuda_ops.lora_shrink_cuda(x, a, p, 1234), e * (M * IN + R * IN + M * R),
           op="lora_shrink", shape=f"M={M} in={IN} r={R} p={p}", dtype=str(DTYPE))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_expand(benchmark, cuda_ops, p):
    """The C input of cuBLAS: forward's C = s·S·Bᵀ + bias (p = 0), backward's keep⊙(dS·A)/(1-p) (p > 0)."""
    s, b, bias = _rnd(M, R), _rnd(OUT, R, scale=0.02), _rnd(OUT)
    e = _esize()
    _bench(benchmark, lambda: cuda_ops.lora_expand_cuda(s, b.t(), None if p else bias, 2.0, p, 1234),
           e * (M * OUT + M * R + OUT * R + OUT), op="lora_expand", shape=f"M={M} N={OUT} r={R} p={p}",
           dtype=str(DTYPE))


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bwd_da(benchmark, cuda_ops, p):
    x, ds = _rnd(M, IN), _rnd(M, R, scale=0.02)
    e = _esize()
    _bench(benchmark, lambda: cuda_ops.lora_bwd_da_cuda(x, ds, p, 1234), e * (M * IN + M * R) + 4 * R * IN,
           op="lora_bwd_da", shape=f"M={M} in={IN} r={R} p={p}", dtype=str(DTYPE))


def test_dy_reduce(benchmark, cuda_ops):
    dy, b, s = _rnd(M, OUT), _rnd(OUT, R, scale=0.02), _rnd(M, R)
    e = _esize()
    nbytes = e * (M * OUT + OUT * R + M * R) + 4 * (M * R + OUT * R)
    _bench(benchmark, lambda: cuda_ops.lora_dy_reduce_cuda(dy, b, s, 2.0), nbytes, op="lora_dy_reduce",
           shape=f"M={M} out={OUT} r={R}", dtype=str(DTYPE))


@pytest.mark.parametrize("impl", ["cuda", "torch_add_mm"])
def test_rank_update(benchmark, cuda_ops, impl):
    w, b, a = _rnd(OUT, IN), _rnd(OUT, R, scale=0.02), _rnd(R, IN, scale=0.02)
    e = _esize()
    nbytes = e * (2 * OUT * IN + OUT * R + R * IN)  # W read and written once; B @ A never stored
    if impl == "cuda":
        fn = lambda: cuda_ops.rank_update_cuda_(w, b, a, 1e-3)  # noqa: E731
    else:
        fn = lambda: w.add_(b @ a, alpha=1e-3)  # noqa: E731  (the eager baseline: an [out, in] temporary)
    _bench(benchmark, fn, nbytes, op=f"rank_update[{impl}]", shape=f"{OUT}x{IN} r={R}", dtype=str(DTYPE))


@pytest.mark.parametrize("m, p", [(1, 0.0), (16, 0.0), (16, 0.1)])
def test_decode(benchmark, cuda_ops, m, p):
    x, w, bias = _rnd(m, IN), _rnd(OUT, IN, scale=0.02), _rnd(OUT)
    a, b = _rnd(R, IN, scale=0.02), _rnd(OUT, R, scale=0.02)
    e = _esize()
    nbytes = e * (OUT * IN + m * IN + R * IN + OUT * R + OUT + m * OUT + m * R)
    _bench(benchmark, lambda: cuda_ops.lora_decode_cuda(x, w, bias, a, b, 2.0, p, 1234), nbytes, op="lora_decode",
           shape=f"M={m} in={IN} out={OUT} r={R} p={p}", dtype=str(DTYPE), w0_bytes=e * OUT * IN)
