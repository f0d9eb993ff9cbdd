"""Errors of fastpeft that more than one module raises (kept here so that no module imports another for them)."""
from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """The backend the caller asked for cannot run on these inputs or on this machine."""


class CudaExtensionError(BackendUnavailableError):
    """The CUDA extension is not built and cannot be built just in time here."""


__all__ = ["BackendUnavailableError", "CudaExtensionError"]
