"""Loading of the CPU extension fastpeft._C_cpu: the dropout stream in C++ (csrc/cpu/).

The extension built by setup.py is used when it imports. Otherwise the first use builds it just in time from
csrc/cpu/ with torch.utils.cpp_extension.load and ninja (a note on stderr while it compiles, under a minute),
cached by torch under $TORCH_EXTENSIONS_DIR. If neither works (no C++ compiler, no ninja, no sources, a
compile error), the PyTorch twin of the stream (fastpeft.dropout) is used instead: same bits, slower, and one
warning per process says why. FASTPEFT_CPU_KERNELS=0 uses the twin without a warning.

The outcome is decided once per process and cached in a module global: `get()` costs one global lookup.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings

from ._ext import _build_config, import_prebuilt  # the CUDA extension's loader: the same build settings

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
JIT_NAME = "fastpeft_C_cpu"
ENV_KERNELS = "FASTPEFT_CPU_KERNELS"


class CpuKernelsWarning(UserWarning):
    """The C++ CPU kernels could not be loaded or built; the (slower) PyTorch twin runs instead."""


_UNRESOLVED = object()
_cached = _UNRESOLVED  # the module, or None (the twin), once decided
_reason: str | None = None  # why the twin is used, once decided
_warned = False
_lock = threading.Lock()


def disabled(env=os.environ) -> bool:
    """FASTPEFT_CPU_KERNELS=0 (or false/no/off): always the PyTorch twin, no warning."""
    return env.get(ENV_KERNELS, "").strip().lower() in ("0", "false", "no", "off")


def prebuilt_status() -> tuple[object | None, str | None]:
    """(module, None) if setup.py built fastpeft._C_cpu and it imports, else (None, why not)."""
    return import_prebuilt("fastpeft._C_cpu")


def jit_reason() -> str | None:
    """Why a just-in-time build cannot be attempted here, or None."""
    cfg = _build_config()
    if cfg is None or not all(os.path.exists(p) for p in cfg.cpu_source_paths()):
        return f"the C++ sources are not installed (no {os.path.join(_CSRC, 'cpu')}); reinstall from a source checkout"
    cxx = os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler was found ({cxx!r} is not on PATH; install g++ or set CXX)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _jit_build():
    from torch.utils import cpp_extension

    cfg = _build_config()
    print("fastpeft: building the CPU kernels just in time (first use only) ...", file=sys.stderr, flush=True)
    mod = cpp_extension.load(
        name=JIT_NAME,
        sources=cfg.cpu_source_paths(),
        extra_include_paths=[cfg.CPU_DIR],
        extra_cflags=[*cfg.CPU_CXX_FLAGS, "-DFASTPEFT_BUILD_KIND=jit"],
        verbose=os.environ.get("FASTPEFT_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    print("fastpeft: CPU kernels built.", file=sys.stderr, flush=True)
    return mod


def _load() -> tuple[object | None, str | None]:
    """(module, None), or (None, why the twin runs)."""
    mod, why = prebuilt_status()
    if mod is not None:
        return mod, None
    jit = jit_reason()
    if jit is not None:
        return None, f"{why}, and it cannot be built just in time: {jit}"
    try:
        return _jit_build(), None
    except Exception as exc:  # compiler errors arrive as RuntimeError with the compiler's output
        text = str(exc).strip()
        return None, (f"{why}, and its just-in-time build failed ({type(exc).__name__}: {text[-2000:]}); "
                      "set FASTPEFT_VERBOSE_BUILD=1 for the compiler command lines")


def _resolve():
    global _cached, _reason, _warned
    with _lock:
        if _cached is not _UNRESOLVED:
            return _cached
        if disabled():
            mod, reason = None, f"disabled by {ENV_KERNELS}=0"
        else:
            mod, reason = _load()
            if mod is None and not _warned:
                _warned = True
                warnings.warn(
                    f"fastpeft: the C++ CPU dropout kernels are unavailable: {reason}. The PyTorch backend uses the "
                    "PyTorch twin of the dropout stream instead: the same results, but slower (each dropout call ~30x, a "
                    "CPU training step with dropout ~2x). "
                    f"Set {ENV_KERNELS}=0 to choose the twin without this warning.",
                    CpuKernelsWarning, stacklevel=4)
        _reason = reason
        _cached = mod
        return mod


def get():
    """The extension module, or None when the PyTorch twin must be used. Decided on the first call."""
    mod = _cached
    if mod is _UNRESOLVED:
        mod = _resolve()
    return mod


def status() -> tuple[object | None, str | None]:
    """(module, None) or (None, why not) after deciding; for reports (fastpeft.info) and tests."""
    return get(), _reason


def reset() -> None:
    """Forget the decision (tests): the next get() decides again. The one-warning-per-process flag stays."""
    global _cached, _reason
    with _lock:
        _cached = _UNRESOLVED
        _reason = None
