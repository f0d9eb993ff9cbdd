"""Backend selection shared by every op.

"torch": pure PyTorch, runs anywhere, the reference twin of the kernels.
"triton": the fused Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"auto": triton for CUDA tensors when Triton imports, torch otherwise.

The environment variable FASTPEFT_BACKEND sets the default for calls that pass backend=None.
A backend the caller named explicitly is never replaced by another: if it cannot run, the call raises.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FASTPEFT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The backend the caller asked for cannot run on these inputs or on this machine."""


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None if it can."""
    err = _triton_import_error()
    if err is not None:
        return f"Triton does not import ({err})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "the tensors are on the CPU and TRITON_INTERPRET=1 was not set before Triton was imported"
    return f"Triton kernels do not run on device type {device.type!r}"


def requested_backend(backend: str | None) -> str:
    """The backend name the caller asked for: the argument, else $FASTPEFT_BACKEND, else 'auto'."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name.lower()


def resolve_backend(backend: str | None, device: torch.device, *, triton_ok: str | None = None) -> str:
    """Return 'torch' or 'triton' for an op on `device`.

    triton_ok: for ops whose Triton kernels cover only some inputs, the reason these inputs are not
    covered (None when they are). 'auto' then picks torch; an explicit 'triton' raises with that reason.
    """
    name = requested_backend(backend)
    if name == "torch":
        return "torch"
    reason = triton_unavailable_reason(device) or triton_ok
    if name == "triton":
        if reason is not None:
            raise BackendUnavailableError(f"backend='triton' cannot run: {reason}")
        return "triton"
    # auto: the kernels on CUDA; on the CPU the interpreter is a test vehicle, never chosen for speed.
    if device.type == "cuda" and reason is None:
        return "triton"
    return "torch"
