"""pytest-benchmark suite of the LoRA linear over fastpeft.bench (see fastpeft/bench/suite.py):
the preset's headline and decode cases, every implementation, training step and inference.

    pytest benchmarks/bench_lora_linear.py --benchmark-only
"""
import pytest

from fastpeft.bench import suite

OP = "lora"


@pytest.mark.parametrize("case,impl,metric", suite.params(OP))
def test_lora(benchmark, case, impl, metric):
    suite.run(benchmark, OP, case, impl, metric)
