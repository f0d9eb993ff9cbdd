"""python -m fastpeft.bench model on a tiny Llama: the JSON it writes, the same first-step loss across variants,
and a variant that starts from other weights or computes another loss is flagged, not timed."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from fastpeft.bench import model as bm  # noqa: E402
from fastpeft.bench import schema  # noqa: E402
from fastpeft.bench.__main__ import main  # noqa: E402
from fastpeft.bench.model_variants import PRESETS, build  # noqa: E402

TINY = dict(PRESETS["cpu"], layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1, vocab=64, seq=16, batch=2,
            steps=2, warmup=1, galore_rank=4)
TINY_FLAGS = ["--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--kv-heads", "1",
              "--vocab", "64", "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--galore-rank", "4"]


def test_cli_writes_the_harness_json(tmp_path):
    rc = main(["model", "--preset", "cpu", "--device", "cpu", *TINY_FLAGS, "--no-compile", "--no-plot",
               "--out", str(tmp_path), "--variants", "full_ft", "peft", "fastpeft", "fastpeft_galore"])
    assert rc == 0
    (path,) = tmp_path.glob("*_cpu_model.json")
    doc = schema.load(str(path))
    assert doc["op"] == "model" and doc["settings"]["floor"] == "full_ft"
    assert doc["meta"]["device_type"] == "cpu" and "command" in doc["meta"] and "torch" in doc["meta"]
    assert [r["impl"] for r in doc["results"]] == ["full_ft", "peft", "fastpeft", "fastpeft_galore"]
    for r in doc["results"]:
        assert r["status"] == "ok", r
        assert r["check"]["same_base_weights"] and r["check"]["passed"]
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["saved_beyond_inputs_bytes"] > 0
        assert len(r["losses"]) == 1 + 1 + 2 + 2 and r["top_ops"]
    # every variant starts from the same weights with LoRA B = 0: the first losses agree to the tolerance
    first = [r["first_loss"] for r in doc["results"]]
    assert max(first) - min(first) <= doc["settings"]["loss_tolerance"] * abs(first[0])
    assert doc["comparisons"]["fastpeft_tokens_vs_peft"] is not None
    json.dumps(doc)  # strict JSON (no NaN)


def _broken(kind):
    def builder(name, model, opts):
        if name == "other_weights":
            with torch.no_grad():
                model.model.embed_tokens.weight.mul_(1.01)
            return build("full_ft", model, opts)
        if name == "other_loss":
            b = build("full_ft", model, opts)
            call = b.call
            b.call = lambda ids: call(ids) * 1.001  # a 1e-3 relative error: far beyond the fp32 tolerance
            return b
        return build(name, model, opts)
    return builder


@pytest.mark.parametrize("kind", ["other_weights", "other_loss"])
def test_a_broken_variant_is_flagged_and_not_timed(kind):
    results = bm.run(TINY, ["full_ft", kind], torch.device("cpu"), builder=_broken(kind))
    ok, bad = results
    assert ok["status"] == "ok"
    assert bad["status"] == "fail" and not bad["check"]["passed"] and "tokens_per_s" not in bad
    assert bad["check"]["same_base_weights"] is (kind != "other_weights")
    assert bm.compare(results)["fastpeft_tokens_vs_peft"] is None


def test_a_raising_variant_is_an_error_and_the_rest_still_run():
    def builder(name, model, opts):
        if name == "boom":
            raise RuntimeError("boom")
        return build(name, model, opts)

    results = bm.run(TINY, ["boom", "full_ft"], torch.device("cpu"), builder=builder)
    assert [r["impl"] for r in results] == ["full_ft", "boom"]  # full_ft runs first: it is the reference
    assert results[0]["status"] == "ok" and results[1]["status"] == "error" and "boom" in results[1]["error"]


def test_live_bytes_releases_freed_storages():
    x = torch.randn(256, 256)
    with bm.LiveBytes() as live:
        y = x @ x
        del y
        z = x + 1
    assert live.peak >= 256 * 256 * 4 and live.live == z.untyped_storage().nbytes()
