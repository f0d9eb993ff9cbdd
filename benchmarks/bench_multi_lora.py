"""pytest-benchmark suite of the multi-adapter LoRA linear over fastpeft.bench (see fastpeft/bench/suite.py).

    pytest benchmarks/bench_multi_lora.py --benchmark-only
"""
import pytest

from fastpeft.bench import suite

OP = "multi-lora"


@pytest.mark.parametrize("case,impl,metric", suite.params(OP))
def test_multi_lora(benchmark, case, impl, metric):
    suite.run(benchmark, OP, case, impl, metric)
