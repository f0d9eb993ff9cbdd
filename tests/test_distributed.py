"""fastpeft's layers under torch.distributed (CPU, gloo, 2 processes): DistributedDataParallel and FSDP2's fully_shard
train every layer type like one process on the concatenated batch; gradient accumulation (no_sync),
torch.compile and autocast keep working; save_adapter / load_adapter across ranks; a failing rank ends the
group with an error on every rank instead of a hang.

Each fixture spawns the 2 processes once (tests/dist_helpers.launch) and runs every case there; the tests compare
what came back with 1-process references computed here. fp32 results: the tolerance table's exact-fp32 row
(tests/tolerances.py) for the first step's gradients and the final weights; bf16 autocast: its bf16 row.
"""
import os

import pytest
import torch

import dist_helpers as dh
from tolerances import assert_close

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
EXTRA = {"lora_accum": dict(kind="lora", accum=2), "lora_amp": dict(kind="lora", amp=True),
         "lora_compiled": dict(kind="lora", compile_backend="aot_eager"),
         "multi_lora_accum": dict(kind="multi_lora", accum=2)}


def _cases(mode):
    cases = {k: dict(kind=k) for k in dh.KINDS}
    cases.update(EXTRA if mode == "ddp" else {k: EXTRA[k] for k in ("lora_accum", "lora_compiled")})
    return cases


def _run_cases(rank, world, mode, tmp):
    out = {name: dh.train(mode=mode, rank=rank, world=world, **c) for name, c in _cases(mode).items()}
    out["checkpoint"] = dh.checkpoint(rank, world, mode, tmp)
    return out


def _launch(mode, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"dist_{mode}")
    return dh.results(dh.launch(_run_cases, WORLD, tmp / "run", mode, str(tmp / "ckpt")))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return _launch("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return _launch("fsdp2", tmp_path_factory)


_single = {}


def single(name, c):
    key = tuple(sorted(c.items()))
    if key not in _single:
        _single[key] = dh.train(mode="single", **c)
    return _single[key]


def _check_equivalent(runs, name, c):
    ref = single(name, c)
    dtype = torch.bfloat16 if c.get("amp") else torch.float32
    for r, res in enumerate(runs):
        got = res[name]
        assert set(got["final"]) == set(ref["final"]) and set(got["grads"]) == set(ref["grads"])
        for n in ref["grads"]:
            assert_close(got["grads"][n], ref["grads"][n].double(), dtype, f"rank {r}: {name}: step-0 gradient of {n}")
        for n in ref["final"]:
            assert not torch.equal(ref["final"][n], ref["init"][n]), f"{name}: {n} did not train"
            assert_close(got["final"][n], ref["final"][n].double(), dtype, f"rank {r}: {name}: trained {n}")
            # replicas stay bitwise equal: each applies the same averaged gradient
            assert torch.equal(got["final"][n], runs[0][name]["final"][n]), f"{name}: {n} differs between ranks"
        # the loss of the whole batch is the mean of the shards' losses
        shard_mean = [(a + b) / 2 for a, b in zip(runs[0][name]["losses"], runs[1][name]["losses"])]
        for a, b in zip(shard_mean, ref["losses"]):
            assert abs(a - b) <= 1e-2 * abs(b) if c.get("amp") else abs(a - b) <= 1e-5 * abs(b)


@pytest.mark.parametrize("name", list(_cases("ddp")))
def test_ddp_equals_one_process(ddp_runs, name):
    _check_equivalent(ddp_runs, name, _cases("ddp")[name])


@pytest.mark.parametrize("name", list(_cases("fsdp2")))
def test_fsdp2_equals_one_process(fsdp_runs, name):
    _check_equivalent(fsdp_runs, name, _cases("fsdp2")[name])


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_save_on_one_rank_load_on_all(mode, ddp_runs, fsdp_runs):
    import fastpeft

    runs = ddp_runs if mode == "ddp" else fsdp_runs
    ck = [r["checkpoint"] for r in runs]
    assert ck[0]["path"] == ck[1]["path"]
    assert all(c["complete_on_return"] for c in ck), "a rank returned from save_adapter before the files were written"
    assert sorted(os.listdir(ck[0]["path"])) == ["adapter_config.json", "adapter_model.safetensors"]
    # the file is the full (unsharded) adapter, in PEFT's format: a plain model loads it here
    model = dh.build("inject_lora", seed=5)
    fastpeft.load_adapter(model, ck[0]["path"])
    for r in range(WORLD):
        assert ck[r]["loaded_equal"], f"rank {r}: the adapter loaded on this rank differs from the saved one"
        for n, t in ck[r]["saved"].items():
            assert torch.equal(dict(model.named_parameters())[n].detach(), t), n


@pytest.mark.parametrize("what", ["ddp_lora", "galore"])
def test_a_failing_rank_ends_the_group_with_an_error(tmp_path, what):
    # rank 1 raises in step 1 while rank 0 is in its collectives: rank 0 must end with an error well inside the
    # process group's timeout (gloo sees the closed connection), not hang until the test's deadline
    outcomes = dh.launch(dh.fail_mid_step, WORLD, tmp_path, what, timeout=90, pg_timeout=20)
    assert not outcomes[1]["ok"] and "failed on purpose" in outcomes[1]["error"]
    assert not outcomes[0]["ok"] and outcomes[0]["exitcode"] == 1, outcomes[0]
    assert outcomes[0]["seconds"] < 60, outcomes[0]
    if what == "galore":  # the GaLore reducer names the layers and the likely cause
        assert "fastpeft.distributed" in outcomes[0]["error"] and "another rank" in outcomes[0]["error"]


def test_a_stalled_rank_ends_the_group_at_the_timeout(tmp_path):
    # rank 1 stops communicating without exiting: the others' GaLore all-reduce fails at the group's timeout
    outcomes = dh.launch(dh.fail_mid_step, WORLD, tmp_path, "galore_stall", timeout=90, pg_timeout=4)
    assert not outcomes[0]["ok"] and "fastpeft.distributed" in outcomes[0]["error"], outcomes[0]
    assert outcomes[0]["seconds"] < 60
