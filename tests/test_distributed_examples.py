"""The README's torchrun examples run on the CPU with gloo (2 processes): DDP + LoRA (save on one rank, load on
all), FSDP2 + LoRA (the adapter gathered for saving, loaded back sharded), DDP + gradient-free GaLore (R averaged
by fastpeft, gradient accumulation under no_sync)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("example, expect", [
    ("ddp_lora.py", "reloaded on every rank: identical"),
    ("fsdp2_lora.py", "reloaded into a sharded model on every rank: identical"),
    ("ddp_galore.py", "all-reduced: GaLore R"),
])
def test_torchrun_example(tmp_path, example, expect):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "examples", example), "--steps", "3", "--hidden", "32", "--seq", "16",
           "--out", str(tmp_path / "adapter")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-3000:]
