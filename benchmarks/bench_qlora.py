"""pytest-benchmark suite of the QLoRA linear (LoRA over a bitsandbytes 4-bit base) over fastpeft.bench (see
fastpeft/bench/suite.py); without bitsandbytes every implementation is skipped with the reason.

    pytest benchmarks/bench_qlora.py --benchmark-only
"""
import pytest

from fastpeft.bench import suite

OP = "qlora"


@pytest.mark.parametrize("case,impl,metric", suite.params(OP))
def test_qlora(benchmark, case, impl, metric):
    suite.run(benchmark, OP, case, impl, metric)
