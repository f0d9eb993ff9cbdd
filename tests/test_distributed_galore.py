"""Gradient-free GaLore under data parallelism (CPU, gloo, 2 processes): R averaged by fastpeft.distributed
equals one process on the concatenated batch, under DDP, FSDP2 (sharded weights) and a bare process group, with
the exact-SVD and the randomized projector, gradient accumulation (no_sync), autocast and torch.compile; the
projectors are identical across ranks; the weights' .grad stays None; the traffic is the rank-r R, not m×n;
unsupported combinations raise.

One fixture spawns the 2 processes once and runs every case (tests/dist_helpers.train_galore); the tests
compare with 1-process references computed here, with the tolerance table's exact-fp32 row (bf16 under
autocast). The R of a randomized refresh step and the bases go through a range finder (QR, SVD) whose
rounding the accumulation length does not describe: those use the table's default k.
"""
import pytest
import torch

import dist_helpers as dh
from tolerances import assert_close

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
GAP = 2  # galore_model's update_proj_gap: steps 0 and 2 refresh
CASES = {
    "ddp_svd": dict(mode="ddp", projector="svd"),
    "ddp_randomized": dict(mode="ddp", projector="randomized", bucket_cap_mb=0.0),  # a bucket per layer
    "fsdp2_svd": dict(mode="fsdp2", projector="svd"),
    "fsdp2_randomized": dict(mode="fsdp2", projector="randomized"),
    "plain_randomized": dict(mode="plain", projector="randomized"),
    "ddp_randomized_accum": dict(mode="ddp", projector="randomized", accum=2),
    "fsdp2_svd_accum": dict(mode="fsdp2", projector="svd", accum=2),
    # the wrappers' own switches: ddp.no_sync(), FSDP2's set_requires_gradient_sync(False)
    "ddp_svd_accum_native": dict(mode="ddp", projector="svd", accum=2, native_no_sync=True),
    "fsdp2_randomized_accum_native": dict(mode="fsdp2", projector="randomized", accum=2, native_no_sync=True),
    "ddp_svd_amp": dict(mode="ddp", projector="svd", amp=True),
    "ddp_randomized_compiled": dict(mode="ddp", projector="randomized", compile_backend="aot_eager"),
    "fsdp2_svd_compiled": dict(mode="fsdp2", projector="svd", compile_backend="aot_eager"),
    # a layer called twice in one forward: its R is reduced after the first use already (a bucket per layer), so
    # the second use waits for that average and adds its own share; with one bucket it is simply updated in place
    "ddp_twice_randomized": dict(mode="ddp", projector="randomized", twice=True, bucket_cap_mb=0.0),
    "fsdp2_twice_svd": dict(mode="fsdp2", projector="svd", twice=True),
}


def _run(rank, world):
    out = {name: dh.train_galore(rank=rank, world=world, **c) for name, c in CASES.items()}
    out["unsupported"] = dh.unsupported(rank, world)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return dh.results(dh.launch(_run, WORLD, tmp_path_factory.mktemp("dist_galore")))


_single = {}


def single(c):
    # compiled (aot_eager) and eager runs compute the same: the eager one is the reference
    key = tuple(sorted((k, v) for k, v in c.items()
                       if k not in ("mode", "bucket_cap_mb", "compile_backend", "native_no_sync")))
    if key not in _single:
        _single[key] = dh.train_galore("single", **dict(key))
    return _single[key]


def _dtype(c):
    return torch.bfloat16 if c.get("amp") else torch.float32


@pytest.mark.parametrize("name", list(CASES))
def test_equals_one_process(runs, name):
    c, ref = CASES[name], single(CASES[name])
    for r in range(WORLD):
        got = runs[r][name]
        # step 0: G (exact-SVD refresh) or R (randomized: R in the reduced sketch's basis), averaged over the ranks
        for i, (a, b) in enumerate(zip(got["projected"][0], ref["projected"][0])):
            assert_close(a, b.double(), _dtype(c), f"rank {r}: {name}: layer {i}: averaged R / G of step 0")
        for n in ref["final"]:
            assert not torch.equal(ref["final"][n], ref["init"][n]), f"{n} did not train"
            assert_close(got["final"][n], ref["final"][n].double(), _dtype(c), f"rank {r}: {name}: trained {n}")
            assert torch.equal(got["final"][n], runs[0][name]["final"][n]), f"{name}: {n} differs between ranks"


@pytest.mark.parametrize("name", list(CASES))
def test_projectors_are_identical_across_ranks(runs, name):
    ref = single(CASES[name])
    a, b = runs[0][name]["bases"], runs[1][name]["bases"]
    assert len(a) == len(ref["bases"]) == 4
    for step in range(4):
        for layer in range(2):
            for i in range(2):  # (P, Q): one of them is used per layer
                pa, pb, pr = a[step][layer][i], b[step][layer][i], ref["bases"][step][layer][i]
                assert (pa is None) == (pb is None) == (pr is None)
                if pa is not None:
                    assert torch.equal(pa, pb), f"{name}: step {step}: layer {layer}: the ranks' bases differ"
                    if step < GAP:
                        # ... and the basis one process finds on the concatenated batch. Only the first refresh's: a
                        # later one starts from weights that already differ by rounding, which the range finder
                        # amplifies by 1/(gap between singular values)
                        assert_close(pa, pr.double(), _dtype(CASES[name]), f"{name}: step {step}: layer {layer}: basis")


@pytest.mark.parametrize("name", list(CASES))
def test_weight_grad_stays_none(runs, name):
    assert runs[0][name]["grads_none"] and runs[1][name]["grads_none"]


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n]["mode"] != "plain" and not CASES[n].get("twice")])
def test_traffic_is_the_rank_r_projection(runs, name):
    c = CASES[name]
    per_bucket = c.get("bucket_cap_mb", 25.0) > 0
    for step, t in enumerate(runs[0][name]["traffic"]):
        refresh = step % GAP == 0
        if refresh and c["projector"] == "svd":
            # an exact-SVD refresh step (1 in update_proj_gap) reduces G itself: the full m×n, counted here
            assert t["bucket_bytes"] == dh.GALORE_W_NUMEL * 4
            continue
        # every other step: the fp32 R of both layers (r·n numbers), once per step whatever the micro-batches
        assert t["bucket_bytes"] == dh.GALORE_R_NUMEL * 4 < dh.GALORE_W_NUMEL * 4
        assert t["bucket_calls"] == (1 if per_bucket else 2)
        if not refresh:  # counted independently, through torch.distributed.all_reduce itself
            assert sum(t["patched_calls"]) == t["bucket_bytes"] and len(t["patched_calls"]) == t["bucket_calls"]
            assert t["refresh_bytes"] == 0
        else:  # the randomized refresh also reduces its skinny sketch products (and broadcasts), never G
            assert 0 < t["refresh_bytes"] and max(t["patched_calls"]) < dh.GALORE_W_NUMEL * 4
            assert t["bucket_bytes"] < sum(t["patched_calls"]) <= t["bucket_bytes"] + t["refresh_bytes"]
        if c["mode"] == "ddp":  # DDP itself reduces only the biases (17 + 9 floats), never the GaLore weights
            assert t["ddp_hook_bytes"] == (17 + 9) * 4


@pytest.mark.parametrize("name", ["ddp_randomized", "ddp_svd", "fsdp2_svd"])
def test_reduction_overlaps_the_backward(runs, name):
    # layer 2 (the last in the forward) finishes its backward first: with a bucket per layer its R is on the wire
    # before the backward reaches layer 0; with one bucket, the launch comes at the backward's end
    per_bucket = CASES[name].get("bucket_cap_mb", 25.0) == 0
    for step in (1, 3):  # steps without a refresh
        events = runs[0][name]["traffic"][step]["events"]
        r = dh.GALORE_R_NUMEL * 2  # each layer's R: 51 fp32 numbers
        assert events == ([r, "layer 0", r] if per_bucket else ["layer 0", 2 * r]), events


def test_unsupported_combinations_raise(runs):
    for r in range(WORLD):
        u = runs[r]["unsupported"]
        assert u["tensor_parallel"] and u["tensor_parallel"].startswith("NotImplementedError") and \
            "tensor parallelism" in u["tensor_parallel"], u
        assert u["wrapped_before_enable"] and u["wrapped_before_enable"].startswith("ValueError") and \
            "before wrapping" in u["wrapped_before_enable"], u
        assert u["galore_group_on_dtensor"] and u["galore_group_on_dtensor"].startswith("NotImplementedError"), u
