"""Loading of the CUDA extension fastpeft._C.

The extension built by setup.py is used when it imports. Otherwise the first call builds it just in time
from csrc/ with torch.utils.cpp_extension.load and ninja (printing a note while it compiles, about a
minute), cached by torch under $TORCH_EXTENSIONS_DIR. If neither works, the error says why: a CPU build
of torch, no visible GPU, no nvcc, no ninja, no csrc/ sources, or the compiler's error.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading

import torch

from .errors import CudaExtensionError  # defined there; fastpeft._ext.CudaExtensionError stays importable

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
JIT_NAME = "fastpeft_C"

_lock = threading.Lock()
_module = None
_failure: str | None = None  # a failed build is not retried in this process (it would fail again, slowly)


def _build_config():
    """csrc/build_config.py (the build settings shared with setup.py), or None without the sources."""
    path = os.path.join(_CSRC, "build_config.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("_fastpeft_build_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def import_prebuilt(name: str) -> tuple[object | None, str | None]:
    """(module, None) if setup.py built the extension `name` and it imports, else (None, why not)."""
    if importlib.util.find_spec(name) is None:
        return None, f"{name} was not built by setup.py"
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # e.g. built against another torch: undefined symbols
        return None, f"{name} does not import ({exc}); rebuild it against this torch"


def prebuilt_status() -> tuple[object | None, str | None]:
    """(module, None) if setup.py built fastpeft._C and it imports, else (None, why not)."""
    return import_prebuilt("fastpeft._C")


def platform_reason() -> str | None:
    """Why CUDA kernels cannot run in this process at all (no torch CUDA, no GPU), or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def jit_reason() -> str | None:
    """Why a just-in-time build cannot be attempted here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    from torch.utils import cpp_extension

    cfg = _build_config()
    if cfg is None:
        return f"the CUDA sources are not installed (no {_CSRC}); reinstall from a source checkout"
    if cfg.find_nvcc(cpp_extension.CUDA_HOME) is None:
        return "nvcc was not found (install the CUDA toolkit and set CUDA_HOME or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here, or None (cheap: never builds anything)."""
    reason = platform_reason()
    if reason is not None or _module is not None:
        return reason
    if _failure is not None:
        return _failure
    mod, why = prebuilt_status()
    if mod is not None:
        return None
    jit = jit_reason()
    return None if jit is None else f"{why}, and it cannot be built just in time: {jit}"


def _jit_arch_spec(cfg) -> str:
    spec = os.environ.get(cfg.ENV_ARCHS)
    if spec:
        return spec
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}{minor}" for major, minor in caps)


def _jit_build():
    from torch.utils import cpp_extension

    cfg = _build_config()
    spec = _jit_arch_spec(cfg)
    flags = cfg.nvcc_arch_flags(spec)  # raises ValueError naming FASTPEFT_CUDA_ARCHS if malformed
    print(f"fastpeft: building the CUDA extension just in time for {cfg.archs_token(spec)} "
          "(first use only; this takes a minute or two)...", file=sys.stderr, flush=True)
    mod = cpp_extension.load(
        name=JIT_NAME,
        sources=cfg.source_paths(_CSRC),
        extra_include_paths=[_CSRC],
        extra_cflags=[*cfg.CXX_FLAGS, f"-DFASTPEFT_ARCHS={cfg.archs_token(spec)}", "-DFASTPEFT_BUILD_KIND=jit"],
        extra_cuda_cflags=[*cfg.NVCC_FLAGS, *flags],
        verbose=os.environ.get("FASTPEFT_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    print("fastpeft: CUDA extension built.", file=sys.stderr, flush=True)
    return mod


def load_extension():
    """The extension module: setup.py's build, else a just-in-time build. Raises CudaExtensionError."""
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise CudaExtensionError(_failure)
        reason = platform_reason()
        if reason is not None:
            raise CudaExtensionError(f"the CUDA backend cannot run: {reason}")
        mod, why = prebuilt_status()
        if mod is None:
            jit = jit_reason()
            if jit is not None:
                _failure = f"the CUDA backend cannot run: {why}, and it cannot be built just in time: {jit}"
                raise CudaExtensionError(_failure)
            try:
                mod = _jit_build()
            except Exception as exc:  # compiler errors arrive as RuntimeError with the compiler's output
                _failure = (f"the just-in-time build of the CUDA extension failed ({type(exc).__name__}): {exc}\n"
                            "Set FASTPEFT_VERBOSE_BUILD=1 for the full compiler command lines.")
                raise CudaExtensionError(_failure) from exc
        _module = mod
        return mod
