"""The presets every op shares: timing, default dtype, CPU threads and which cases time torch.compile.

Each op's module gives the cases of each preset (its `cases(preset)`); this module gives how they run.
  quick  GPU, the default there: each op's headline cases and a few around them (all ops in ~3 minutes)
  full   GPU: each op's full grid, one axis at a time around the headline
  cpu    the default without a GPU: small fp32 cases, one thread (figures of the PyTorch paths only)
  smoke  tiny odd shapes with a handful of repetitions: the tests' preset, its times mean nothing
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
COMPILE_POLICIES = ("none", "headline", "all")

PRESETS = {
    "full": dict(dtype="bf16", compile="headline", timing=dict(warmup_ms=25, rep_ms=80, min_reps=10, max_reps=300)),
    "quick": dict(dtype="bf16", compile="headline", timing=dict(warmup_ms=10, rep_ms=40, min_reps=10, max_reps=200)),
    # torch.compile (inductor) takes ~20 s per graph on a 2-core CPU: not part of the cpu preset's minute
    "cpu": dict(dtype="fp32", compile="none", threads=1, timing=dict(warmup_ms=2, rep_ms=15, min_reps=11, max_reps=100)),
    "smoke": dict(dtype="fp32", compile="none", threads=1, timing=dict(warmup_ms=0, rep_ms=1, min_reps=2, max_reps=3)),
}


def check_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def default_preset(device: torch.device) -> str:
    return "quick" if device.type == "cuda" else "cpu"


@dataclass
class Settings:
    """How one run measures: timing, L2 flush policy, metrics, seed, torch.compile policy."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 1000
    flush: str = "auto"  # "auto": flush L2 for memory-bound cases on CUDA; "always"; "never"
    metrics: tuple | None = None  # None: every metric the op has
    seed: int = 0
    compile: str = "none"  # which cases time the torch.compile baseline: "none", "headline" or "all"
    compile_backend: str = "inductor"
    backends: tuple = ("torch", "triton", "cublas")  # fastpeft backends timed where they can run
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "Settings":
        spec = check_preset(preset)
        kw = dict(spec["timing"], compile=spec["compile"])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        st = cls(**kw)
        st.validate()
        return st

    def validate(self) -> None:
        if self.min_reps < 1 or self.max_reps < self.min_reps:
            raise ValueError(f"max_reps: expected >= min_reps {self.min_reps} >= 1, got {self.max_reps}")
        if self.flush not in ("auto", "always", "never"):
            raise ValueError(f"flush: expected auto, always or never, got {self.flush!r}")
        if self.compile not in COMPILE_POLICIES:
            raise ValueError(f"compile: expected one of {COMPILE_POLICIES}, got {self.compile!r}")

    def timing_kwargs(self) -> dict:
        return dict(warmup_ms=self.warmup_ms, rep_ms=self.rep_ms, min_reps=self.min_reps, max_reps=self.max_reps)

    def as_dict(self) -> dict:
        return {"timing": {**self.timing_kwargs(), "flush": self.flush}, "metrics": list(self.metrics or ()),
                "seed": self.seed, "compile": self.compile, "compile_backend": self.compile_backend,
                "backends": list(self.backends)}


__all__ = ["DTYPES", "DTYPE_NAMES", "PRESETS", "COMPILE_POLICIES", "Settings", "check_preset", "default_preset"]
