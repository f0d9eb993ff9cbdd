"""The oldest Triton the kernels need is stated once (fastpeft.kernels.MIN_TRITON), required by setup.py, met
by the installed Triton, and an older one is refused on import with a reason that says what to do."""
from __future__ import annotations

import os
import re

import pytest

import fastpeft  # noqa: F401 (maps kernels/ to fastpeft.kernels in a source tree)
from fastpeft import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_py_requires_min_triton():
    text = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    found = re.findall(r"""["']triton\s*>=\s*([0-9.]+)""", text)
    assert found == [kernels.MIN_TRITON], found


def test_min_triton_is_the_release_that_named_make_tensor_descriptor():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    # the kernels' tensor descriptors: public from Triton 3.4 (3.3 had tl._experimental_make_tensor_descriptor)
    assert hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
    assert kernels.MIN_TRITON == "3.4"


def test_installed_triton_satisfies_it():
    triton = pytest.importorskip("triton")
    assert kernels.triton_version_error() is None, triton.__version__
    assert kernels.triton_version_error(triton.__version__) is None


@pytest.mark.parametrize("version, ok", [
    ("3.4.0", True), ("3.4", True), ("3.5.0rc1", True), ("3.4.0+git1a2b3c4", True), ("3.10.0", True),
    ("4.0.0", True), ("3.3.1", False), ("3.2.0", False), ("2.3.1", False), ("3.3.0+gitabcdef", False),
])
def test_version_comparison(version, ok):
    assert (kernels.triton_version_error(version) is None) == ok


def test_older_triton_is_refused_with_a_clear_reason(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    reason = kernels.triton_version_error()
    assert reason is not None
    for part in ("Triton 3.3.1", f">= {kernels.MIN_TRITON}", "make_tensor_descriptor", f"triton>={kernels.MIN_TRITON}",
                 "backend='torch'"):
        assert part in reason, (part, reason)
    with pytest.raises(ImportError, match=r"Triton 3\.3\.1 is too old"):
        kernels.require_triton()


def test_kernel_modules_check_the_version_on_import(monkeypatch):
    """A kernel module imported under an older Triton raises the ImportError (common.py runs the check)."""
    triton = pytest.importorskip("triton")
    import importlib.util
    import sys

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    # a fresh copy of kernels/common.py under another name: the cached module and its users stay untouched
    spec = importlib.util.spec_from_file_location("fastpeft.kernels._common_version_probe",
                                                  os.path.join(os.path.dirname(kernels.__file__), "common.py"))
    probe = importlib.util.module_from_spec(spec)
    try:
        with pytest.raises(ImportError, match=r"Triton 3\.2\.0 is too old"):
            spec.loader.exec_module(probe)
    finally:
        sys.modules.pop("fastpeft.kernels._common_version_probe", None)


def test_backend_reports_an_old_triton_as_unavailable(monkeypatch):
    """backend='triton' raises, and 'auto' passes over Triton, with the version reason, not a kernel error."""
    import triton
    import torch

    import fastpeft
    from fastpeft import _backend

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    _backend._triton_import_error.cache_clear()
    try:
        reason = _backend.triton_unavailable_reason(torch.device("cpu"))
        assert reason is not None and "Triton 3.3.1 is too old" in reason and ">= 3.4" in reason
        x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        with pytest.raises(fastpeft.BackendUnavailableError, match="too old"):
            fastpeft.lora_linear(x, w, a, b, 1.0, backend="triton")
    finally:
        _backend._triton_import_error.cache_clear()
