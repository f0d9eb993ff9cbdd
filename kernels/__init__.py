"""Triton kernels of fastpeft, importable as fastpeft.kernels. Import Triton lazily through these modules.

Each op's kernels and launchers live in one module (lora_linear, multi_lora, ia3, adapter, galore), the
larger ops' tile tables beside it (lora_linear_configs, multi_lora_configs) and multi-LoRA's token grouping
in multi_lora_grouping. common holds what they share (interpreter and precision helpers, path choice,
config resolution, grid splits, the grouped tile order), gemm_loop the GEMM main loop of lora_linear,
multi_lora and ia3, philox the dropout stream.

MIN_TRITON is the oldest Triton the kernels compile with: they build device-side tensor descriptors with
`tl.make_tensor_descriptor`, which Triton 3.3 still called `tl._experimental_make_tensor_descriptor`. Every
kernel module checks the installed version on import (kernels/common.py) and raises an ImportError that
says so; `triton_version_error()` gives the same reason without raising.
"""
from __future__ import annotations

import re

MIN_TRITON = "3.4"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "3.4.0", "3.5.0rc1" or "3.4.0+git1a2b3c"."""
    return tuple(int(p) for p in re.findall(r"\d+", re.match(r"[\d.]*", version).group(0)))


def triton_version_error(version: str | None = None) -> str | None:
    """Why the installed Triton (or `version`) cannot run the kernels, or None when it can."""
    if version is None:
        import triton

        version = triton.__version__
    if _release(version) >= _release(MIN_TRITON):
        return None
    return (f"Triton {version} is too old for the fastpeft kernels: they need Triton >= {MIN_TRITON} "
            f"(tl.make_tensor_descriptor); install it with pip install 'triton>={MIN_TRITON}', or use backend='torch'")


def require_triton() -> None:
    """Raise ImportError with `triton_version_error()`'s reason when the installed Triton is too old."""
    reason = triton_version_error()
    if reason is not None:
        raise ImportError(reason)
