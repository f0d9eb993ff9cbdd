"""Communication in the benchmarks (fastpeft.bench.comm): the bytes all-reduced per data-parallel step, counted
through DDP's comm hook and fastpeft's GaLore reducer in a 1-process group, equal the figures on paper for full
fine-tuning, LoRA and gradient-free GaLore; the Llama-7B table; the comm column of the whole-model benchmark."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from fastpeft.bench import comm  # noqa: E402
from fastpeft.bench import model as bm  # noqa: E402
from fastpeft.bench.__main__ import main  # noqa: E402
from fastpeft.bench.model_variants import PRESETS  # noqa: E402

TINY = dict(PRESETS["cpu"], layers=1, hidden=32, intermediate=72, heads=2, kv_heads=1, vocab=64, seq=16, batch=2,
            steps=2, warmup=1, galore_rank=4)


def test_llama_7b_table_on_paper():
    rows = {r["label"]: r for r in comm.llama7b_table((128, 512))}
    h, i, layers = 4096, 11008, 32
    full = rows["full fine-tuning"]
    assert full["linears"] == layers * (4 * h * h + 3 * h * i) * 2  # bf16 gradients
    assert full["rest"] == (2 * 32000 * h + (2 * layers + 1) * h) * 2
    lora = rows["LoRA r=16 (7 linear kinds)"]
    assert lora["linears"] == layers * 16 * (4 * 2 * h + 3 * (h + i)) * 2 and lora["rest"] == 0
    g128, g512 = rows["GaLore grad-free rank 128"], rows["GaLore grad-free rank 512"]
    # fp32 R of max(m, n)·r numbers per matrix: q,k,v,o h·r, gate and up i·r, down i·r
    assert g128["linears"] == layers * (4 * h + 3 * i) * 128 * 4
    assert g512["linears"] == 4 * g128["linears"]
    assert g128["linears_vs_full"] == pytest.approx(16.0, rel=0.02)  # (m / r) / 2: bf16 gradients vs fp32 R
    assert g128["rest"] == full["rest"]  # embeddings, norms and head are trained with full gradients
    # a randomized refresh (1 step in update_proj_gap): 3·(m + n)·136 fp32 sketch numbers per matrix, + seed, basis
    per_layer = sum(3 * (m + n) * 136 * 4 + 8 + min(m, n) * 128 * 2
                    for m, n in [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)])
    assert g128["refresh_extra"] == layers * per_layer
    text = comm.format_table(list(rows.values()))
    assert "GaLore grad-free rank 512" in text and "GiB" in text


@pytest.mark.parametrize("variant", ["full_ft", "fastpeft", "fastpeft_galore", "galore_torch"])
def test_counted_bytes_equal_paper(variant):
    if variant == "galore_torch":
        from fastpeft.bench.galore import load_galore_torch

        if load_galore_torch() is None:
            pytest.skip("galore-torch is not installed")
    (rec,) = comm.run(TINY, [variant], torch.device("cpu"))
    assert rec["status"] == "ok", rec
    assert rec["bytes_per_step"] == rec["paper"]["total"], rec
    assert not torch.distributed.is_initialized()  # the 1-process group is gone again
    if variant == "fastpeft_galore":
        assert rec["galore_r_bytes"] == rec["paper"]["linears"]  # the rank-r R, not m×n
        assert rec["ddp_bytes"] == rec["paper"]["rest"]  # DDP reduces the rest, never a GaLore weight
        full = comm.paper_bytes(TINY, "full_ft", grad_bytes=4)
        assert rec["galore_r_bytes"] < full["linears"]
        # step 0 refreshes the projector: its sketch products, seed and basis travel too, as counted on paper
        assert rec["first_step_bytes"] == rec["bytes_per_step"] + comm.paper_refresh_bytes(TINY, basis_bytes=4)


def test_cli(capsys):
    assert main(["comm", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "Llama-7B" in out and "full fine-tuning" in out and "rank 128" in out


def test_model_bench_comm_column():
    results = bm.run(TINY, ["full_ft", "fastpeft", "fastpeft_galore"], torch.device("cpu"), comm=True)
    for r in results:
        assert r["status"] == "ok", r
        assert r["comm"]["status"] == "ok" and r["comm"]["bytes_per_step"] == r["comm"]["paper_bytes_per_step"]
        assert "comm " in bm._line(r)
    by = {r["impl"]: r["comm"]["bytes_per_step"] for r in results}
    assert by["fastpeft_galore"] < by["full_ft"] and by["fastpeft"] < by["full_ft"]
