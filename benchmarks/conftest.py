"""pytest setup for the benchmark suite: `pytest benchmarks/ --benchmark-only`.

Collects bench_*.py files (pytest's default only collects test_*.py), so the suite is never picked up by
`pytest tests`. Nothing here sets TRITON_INTERPRET: on a CPU-only machine the suite times the PyTorch
backend against the baselines, and the Triton backend is skipped with its reason.
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
