"""pytest-benchmark suite of the DoRA linear over fastpeft.bench (see fastpeft/bench/suite.py).

    pytest benchmarks/bench_dora.py --benchmark-only
"""
import pytest

from fastpeft.bench import suite

OP = "dora"


@pytest.mark.parametrize("case,impl,metric", suite.params(OP))
def test_dora(benchmark, case, impl, metric):
    suite.run(benchmark, OP, case, impl, metric)
