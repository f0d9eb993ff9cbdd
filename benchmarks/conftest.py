"""pytest setup for the benchmark suites: `pytest benchmarks/ --benchmark-only`.

Collects bench_*.py files (pytest's default only collects test_*.py), so the suites are never picked up by
`pytest tests`. A file named on the command line is collected by pytest itself: not again here. Nothing
here sets TRITON_INTERPRET: on a CPU-only machine the suites time the PyTorch paths against the baselines,
and the Triton backend is skipped with its reason. The suites are thin: see fastpeft/bench/suite.py.
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
