"""Backend selection shared by every op.

"torch": pure PyTorch, runs anywhere, the reference twin of the kernels.
"triton": the fused Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"cuda": the CUDA C++ kernels of csrc/ (fastpeft._C) where an op has them; CUDA tensors only.
"cublas": cuBLAS for an op's big GEMMs (torch.addmm, the low-rank term as its C input), Triton kernels for the
rest, where an op has that path (the LoRA linear, IA3, multi-LoRA, the GaLore linear's backward and GaLoreAdamW:
ops/*_cublas.py); CUDA tensors (CPU tensors under TRITON_INTERPRET=1 for the tests, never chosen by auto there).
"auto": on CPU tensors, torch. On CUDA tensors, for an op that measures (resolve_backend(measured=True): the
LoRA linear, IA3, multi-LoRA), "measured": the op's dispatcher times every backend that can run on the first call of each shape
bucket and keeps the fastest (fastpeft/autotune.py: on-disk cache, FASTPEFT_AUTOTUNE=0, a time cap). Otherwise,
and where measuring is off, the static default: the backend in AUTO_CHOICE (what the benchmarks showed fastest
on the device class), else triton when Triton imports, torch otherwise. fastpeft.backend_report() shows the
choices and the measured timings.

The environment variable FASTPEFT_BACKEND sets the default for calls that pass backend=None.
A backend the caller named explicitly is never replaced by another: if it cannot run, the call raises.
"""
from __future__ import annotations

import functools
import os

import torch

from ._env import interpreter_enabled  # the one helper, shared with kernels/common.py
from .errors import BackendUnavailableError  # defined there; fastpeft._backend.BackendUnavailableError stays importable

BACKENDS = ("auto", "torch", "triton", "cuda", "cublas")
MEASURED = "measured"  # what resolve_backend(measured=True) returns for auto on CUDA: the op measures per shape
ENV_VAR = "FASTPEFT_BACKEND"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        from .kernels import triton_version_error  # too old a Triton is unavailable, with the reason
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"Triton does not import ({type(exc).__name__}: {exc})"
    return triton_version_error()


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None if it can."""
    err = _triton_import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "the tensors are on the CPU and TRITON_INTERPRET=1 was not set before Triton was imported"
    return f"Triton kernels do not run on device type {device.type!r}"


def cuda_unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA C++ backend cannot run on `device`, or None if it can (never builds anything)."""
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, and these are on {device.type!r}"
    from . import _ext

    return _ext.unavailable_reason()


def cublas_unavailable_reason(device: torch.device) -> str | None:
    """Why the cuBLAS backend (cuBLAS GEMMs plus Triton skinny kernels) cannot run on `device`, or None."""
    if device.type == "cpu" and not interpreter_enabled():
        return ("the cuBLAS backend runs on CUDA tensors (its skinny kernels are Triton's; on the CPU only under "
                "TRITON_INTERPRET=1, for tests), and these are on the CPU")
    if device.type not in ("cuda", "cpu"):
        return f"the cuBLAS backend runs on CUDA tensors, and these are on {device.type!r}"
    err = _triton_import_error()
    return None if err is None else f"its skinny kernels need Triton: {err}"


# (op, device class) -> backend that measurements showed fastest. Empty until a GPU run of the benchmarks
# fills it: no backend is preferred over Triton on a guess.
AUTO_CHOICE: dict[tuple[str, str], str] = {}


def device_class(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def requested_backend(backend: str | None) -> str:
    """The backend name the caller asked for: the argument, else $FASTPEFT_BACKEND, else 'auto'."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name.lower()


def resolve_backend(backend: str | None, device: torch.device, *, triton_ok: str | None = None,
                    cuda_ok: str | None = "this op has no CUDA C++ kernels", op: str = "",
                    cublas_ok: str | None = "this op has no cuBLAS path", measured: bool = False) -> str:
    """Return 'torch', 'triton', 'cuda' or 'cublas' for an op on `device` ('measured': see below).

    triton_ok / cuda_ok / cublas_ok: for ops whose kernels cover only some inputs, the reason these inputs are
    not covered (None when they are). 'auto' then passes over that backend; an explicit request raises with it.
    measured: the op has a measuring dispatcher (fastpeft/autotune.py); 'auto' on a CUDA device then returns
    MEASURED, unless FASTPEFT_AUTOTUNE=0 or at most one backend can run, where the static default decides.
    """
    name = requested_backend(backend)
    if name == "torch":
        return "torch"
    if name == "auto" and device.type != "cuda":  # the CPU interpreter is a test vehicle, never chosen for speed
        return "torch"
    if name == "cuda":
        reason = cuda_unavailable_reason(device) or cuda_ok
        if reason is not None:
            raise BackendUnavailableError(f"backend='cuda' cannot run: {reason}")
        return "cuda"
    if name == "cublas":
        reason = cublas_ok or cublas_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend='cublas' cannot run: {reason}")
        return "cublas"
    if name == "triton":
        reason = triton_unavailable_reason(device) or triton_ok
        if reason is not None:
            raise BackendUnavailableError(f"backend='triton' cannot run: {reason}")
        return "triton"
    # auto on a CUDA device
    if measured:
        from . import autotune

        if autotune.enabled() and len(candidates(device, triton_ok=triton_ok, cuda_ok=cuda_ok, cublas_ok=cublas_ok)) > 1:
            return MEASURED
    return static_default(device, triton_ok=triton_ok, cuda_ok=cuda_ok, op=op)


def static_default(device: torch.device, *, triton_ok: str | None = None, cuda_ok: str | None = None,
                   op: str = "") -> str:
    """What auto picks on a CUDA `device` without measuring: AUTO_CHOICE's entry, else triton, else torch."""
    if device.type != "cuda":
        return "torch"
    if AUTO_CHOICE.get((op, device_class(device))) == "cuda" and cuda_ok is None and cuda_unavailable_reason(device) is None:
        return "cuda"
    if triton_ok is None and triton_unavailable_reason(device) is None:
        return "triton"
    return "torch"


def candidates(device: torch.device, *, triton_ok: str | None = None, cuda_ok: str | None = None,
               cublas_ok: str | None = None) -> list[str]:
    """The backends auto may time on `device` (CUDA: torch always; triton, cublas, cuda where they can run)."""
    out = ["torch"]
    if device.type != "cuda":
        return out
    if triton_ok is None and triton_unavailable_reason(device) is None:
        out.append("triton")
    if cublas_ok is None and cublas_unavailable_reason(device) is None:
        out.append("cublas")
    if cuda_ok is None and cuda_unavailable_reason(device) is None:
        out.append("cuda")
    return out


def backend_report(device: torch.device | str | None = None) -> dict:
    """What can run on `device` (default: the current CUDA device, else the CPU) and why not, what
    backend='auto' picks for the LoRA linear, IA3 and multi-LoRA there ('measured': per shape, see "autotune"), and under
    "autotune" every measured decision of this process (key, backend, per-backend milliseconds, source)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    reasons = {"torch": None, "triton": triton_unavailable_reason(device), "cuda": cuda_unavailable_reason(device),
               "cublas": cublas_unavailable_reason(device)}
    from . import autotune

    return {
        "device": str(device),
        "device_class": device_class(device),
        "available": {k: v is None for k, v in reasons.items()},
        "why_not": {k: v for k, v in reasons.items() if v is not None},
        "auto": {"lora_linear": resolve_backend("auto", device, cuda_ok=None, cublas_ok=None, op="lora_linear",
                                                measured=True),
                 "ia3_linear": resolve_backend("auto", device, cublas_ok=None, op="ia3_linear", measured=True),
                 "multi_lora_linear": resolve_backend("auto", device, cublas_ok=None, op="multi_lora_linear",
                                                      measured=True)},
        "auto_measured": {f"{op}@{cls}": be for (op, cls), be in AUTO_CHOICE.items()},
        "default_from_env": os.environ.get(ENV_VAR),
        "autotune": autotune.report(),  # the measured choices of this process, with their timings
    }
