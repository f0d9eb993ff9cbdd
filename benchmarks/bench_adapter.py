"""pytest-benchmark suite of the bottleneck adapter over fastpeft.bench (see fastpeft/bench/suite.py).

    pytest benchmarks/bench_adapter.py --benchmark-only
"""
import pytest

from fastpeft.bench import suite

OP = "adapter"


@pytest.mark.parametrize("case,impl,metric", suite.params(OP))
def test_adapter(benchmark, case, impl, metric):
    suite.run(benchmark, OP, case, impl, metric)
