"""pytest-benchmark suite of GaLore over fastpeft.bench (see fastpeft/bench/suite.py): the gradient-free
layer's training step, the optimizer step and the projector refresh; and an end-to-end training-quality run.

    pytest benchmarks/bench_galore.py --benchmark-only
"""
import math

import pytest
import torch

from fastpeft.bench import galore_e2e, suite

OP = "galore"


@pytest.mark.parametrize("case,impl,metric", suite.params(OP))
def test_galore(benchmark, case, impl, metric):
    suite.run(benchmark, OP, case, impl, metric)


def test_galore_e2e_loss(benchmark):
    """A small Llama, AdamW vs gradient-free GaLore (200 steps on CUDA, 20 on the CPU): both losses fall;
    their ratio is recorded (the paper: within a few percent)."""
    pytest.importorskip("transformers")
    cuda = suite.DEVICE.type == "cuda"
    res = benchmark.pedantic(galore_e2e.losses, args=(200 if cuda else 20, suite.DEVICE, not cuda), rounds=1,
                             iterations=1)
    benchmark.extra_info.update(res, device=str(suite.DEVICE), torch=torch.__version__)
    for mode in ("adamw", "galore_gradient_free"):
        assert math.isfinite(res[mode]["final_loss_avg10"]) and res[mode]["final_loss_avg10"] < res[mode]["first_loss"]
