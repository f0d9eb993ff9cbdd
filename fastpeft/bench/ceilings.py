"""The device's measured ceilings, taken in the same run as the figures they scale: a big torch.mm per
dtype (TFLOP/s) and a big device-to-device copy (GB/s, bytes read + written).

Every result's achieved TFLOP/s and GB/s (its case's necessary FLOPs and bytes over its time) are reported
as fractions of these. A fraction above 1 is possible for a small case whose operands stay in cache.
"""
from __future__ import annotations

import torch

from .timing import time_fn

# square GEMM side and copy size per device type: large enough to run at the device's steady rate
GEMM_N = {"cuda": 8192, "cpu": 512}
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
_TIMING = dict(warmup_ms=10, rep_ms=60, min_reps=5, max_reps=100)


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """TFLOP/s of torch.mm on n x n operands (2·n³ FLOPs), median of repetitions."""
    n = n or GEMM_N.get(device.type, 512)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b, out=out), device, **_TIMING)
    return 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12


def copy_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """GB/s (bytes read + written) of a device-to-device copy of nbytes, median of repetitions."""
    nbytes = nbytes or COPY_BYTES.get(device.type, 64 << 20)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **_TIMING)
    return 2.0 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


class Ceilings:
    """Measured once per process and device, per dtype on first use (shared by the ops of a run)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gemm: dict[str, float] = {}
        self.copy: float | None = None

    def measure(self, dtypes) -> "Ceilings":
        from .presets import DTYPE_NAMES

        for dt in dtypes:
            name = DTYPE_NAMES[dt]
            if name not in self.gemm:
                self.gemm[name] = gemm_tflops(self.device, dt)
        if self.copy is None:
            self.copy = copy_gbps(self.device)
        return self

    def as_dict(self) -> dict:
        return {"gemm_tflops": dict(self.gemm), "copy_gbps": self.copy,
                "method": f"torch.mm {GEMM_N.get(self.device.type, 512)}^3 per dtype; copy of "
                          f"{COPY_BYTES.get(self.device.type, 64 << 20) >> 20} MiB (read + write); medians"}

    def rates(self, dtype_name: str, flops: float, nbytes: float, ms: float) -> dict:
        """Achieved TFLOP/s and GB/s of `flops` and `nbytes` in `ms`, and their fractions of the ceilings."""
        s = ms * 1e-3
        tflops, gbps = flops / s / 1e12, nbytes / s / 1e9
        peak = self.gemm.get(dtype_name)
        return {"tflops": tflops, "gbps": gbps,
                "gemm_frac": tflops / peak if peak else None,
                "copy_frac": gbps / self.copy if self.copy else None}


__all__ = ["Ceilings", "gemm_tflops", "copy_gbps"]
