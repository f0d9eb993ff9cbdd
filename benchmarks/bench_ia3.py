"""pytest-benchmark suite of IA3 over fastpeft.bench (see fastpeft/bench/suite.py).

    pytest benchmarks/bench_ia3.py --benchmark-only
"""
import pytest

from fastpeft.bench import suite

OP = "ia3"


@pytest.mark.parametrize("case,impl,metric", suite.params(OP))
def test_ia3(benchmark, case, impl, metric):
    suite.run(benchmark, OP, case, impl, metric)
