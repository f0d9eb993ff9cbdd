"""The IA3 and multi-LoRA GEMMs' measured configs (kernels/gemm_tuning.py), on the CPU with injected timings:
the fastest candidate is chosen, cached and run; FASTPEFT_AUTOTUNE=0 gives the static default without timing;
CPU tensors take the interpreter config untuned; and every GPU candidate's tiles, forced through `tuned=`, give
the float64 reference under the interpreter (fp32 dots are exact there, so the tiling alone is tested)."""
import pytest
import torch

from fastpeft import autotune
from fastpeft.kernels import gemm_tuning
from fastpeft.kernels import ia3 as ki
from fastpeft.kernels import multi_lora as km
from fastpeft.kernels.common import path_for
from test_autotune import FakeTimer, tuned  # noqa: F401 (a fixture)
from tolerances import assert_close

ALT = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, RANK_CHUNK=16, num_warps=4, num_stages=1)


def _ia3_args(m=37, k=40, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    """x, W, bias, the input-scaling vector [K], the output-scaling one [N]."""
    return (x, w, torch.randn(n, generator=g), torch.rand(k, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5)


def _multi_args(m=37, k=40, n=24, seed=0):
    """P, Qᵀ, L (fp32 S), pool Rmᵀ, bias, ids (-1 and 7: base only), scalings, ranks, offsets; n_adapters, r_max."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.tensor([8, 5, 0], dtype=torch.int32)
    offsets = torch.tensor([0, 8, 13], dtype=torch.int32)
    ids = torch.randint(-1, 4, (m,), generator=g)
    ids[3] = 7
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(m, 8, generator=g),
            torch.randn(n, 13, generator=g), torch.randn(n, generator=g), ids, torch.tensor([0.5, 2.0, 1.0]),
            ranks, offsets), 3, 8


def _multi_reference(p, q_t, lo, rm_t, bias, ids, scale, ranks, offsets):
    y = p.double() @ q_t.double().t() + bias.double()
    for a in range(len(ranks)):
        r, o = int(ranks[a]), int(offsets[a])
        sel = ids == a
        y[sel] += float(scale[a]) * lo[sel, :r].double() @ rm_t[:, o:o + r].double().t()
    return y


@pytest.fixture
def ia3_tuned(tuned, monkeypatch):
    monkeypatch.setattr(gemm_tuning, "tunable", lambda device: True)
    monkeypatch.setattr(ki, "gemm_candidates", lambda M, dtype, path, fused: {"default": ki.INTERPRET_GEMM_CONFIG,
                                                                               "alt": ALT})
    return tuned


@pytest.fixture
def multi_tuned(tuned, monkeypatch):
    monkeypatch.setattr(gemm_tuning, "tunable", lambda device: True)
    monkeypatch.setattr(km, "gemm_candidates", lambda M, dtype, path: {"default": km.INTERPRETER_CONFIGS["gemm"],
                                                                       "alt": ALT})
    return tuned


def test_ia3_fastest_config_is_chosen_cached_and_run(ia3_tuned):
    timer = FakeTimer({"default": 2.0, "alt": 1.0}, run=True)
    autotune.set_timer(timer)
    x, w, bias, lv, lo = _ia3_args()
    before = [t.clone() for t in (x, w, bias, lv, lo)]
    rng = torch.get_rng_state()
    y = ki.ia3_fwd(x, w, bias, lv, "input")
    assert sorted(timer.calls) == ["alt", "default"] and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(t, u) for t, u in zip((x, w, bias, lv, lo), before))
    ref = torch.empty_like(y)
    ki._gemm(x, w, b_kn=False, N=24, K=40, c=ref, bias=bias, pro=lv, tuned=("tma", ALT))
    assert torch.equal(y, ref)
    assert_close(y, (x.double() * lv.double()) @ w.double().t() + bias.double(), torch.float32, "y")
    ki.ia3_fwd(x[:33], w, bias, lv, "input")  # M = 33: the same bucket (m64), nothing timed again
    assert len(timer.calls) == 2
    ki.ia3_fwd(x, w, bias, lo, "output")  # another variant: its own key
    assert len(timer.calls) == 4
    recs = [r for r in autotune.report()["decisions"] if r["op"] == ki.OP]
    assert [r["key"] for r in recs] == ["torch.float32|tma|m64|n24|k40|bias+pro+c", "torch.float32|tma|m64|n24|k40|bias+epi+c"]
    assert all(r["backend"] == "alt" and r["source"] == "measured" for r in recs)
    assert gemm_tuning.chosen_configs(ki.OP)[0]["detail"] == ALT


def test_multi_lora_fastest_config_is_chosen_cached_and_run(multi_tuned):
    timer = FakeTimer({"default": 1.0, "alt": 3.0}, run=True)
    autotune.set_timer(timer)
    args, n, r_max = _multi_args()
    before = [t.clone() for t in args]
    y = km.multi_lora_gemm(*args, n, r_max)
    assert sorted(timer.calls) == ["alt", "default"]
    assert all(torch.equal(t, u) for t, u in zip(args, before))
    assert torch.equal(y, km.multi_lora_gemm(*args, n, r_max, tuned=("tma", km.INTERPRETER_CONFIGS["gemm"])))
    assert_close(y, _multi_reference(*args), torch.float32, "y")
    (rec,) = gemm_tuning.chosen_configs(km.OP)
    assert rec["backend"] == "default" and rec["key"] == "torch.float32|tma|m64|n24|k40|r16|q_nk|bias|scale"
    assert rec["detail"] == km.INTERPRETER_CONFIGS["gemm"]
    km.multi_lora_gemm(*args, n, r_max)
    assert len(timer.calls) == 2


@pytest.mark.parametrize("op", ["ia3", "multi"])
def test_autotune_off_gives_the_static_default(ia3_tuned, multi_tuned, monkeypatch, op):
    monkeypatch.setenv(autotune.ENV_ENABLE, "0")
    timer = FakeTimer({"default": 2.0, "alt": 1.0})
    autotune.set_timer(timer)
    if op == "ia3":
        x, w, bias, _, lo = _ia3_args()
        y = ki.ia3_fwd(x, w, bias, lo, "output")
        ref = torch.empty_like(y)
        ki._gemm(x, w, b_kn=False, N=24, K=40, c=ref, bias=bias, epi=lo, tuned=("tma", ki.INTERPRET_GEMM_CONFIG))
    else:
        args, n, r_max = _multi_args()
        y = km.multi_lora_gemm(*args, n, r_max)
        ref = km.multi_lora_gemm(*args, n, r_max, tuned=("tma", km.INTERPRETER_CONFIGS["gemm"]))
    assert timer.calls == [] and torch.equal(y, ref) and not ia3_tuned.exists()
    (rec,) = autotune.report()["decisions"]
    assert rec["backend"] == "default" and rec["source"] == "static"


def test_cpu_tensors_are_not_tuned(tuned):
    assert not gemm_tuning.tunable(torch.device("cpu"))
    x, w, bias, lv, _ = _ia3_args()
    ki.ia3_fwd(x, w, bias, lv, "input")
    args, n, r_max = _multi_args()
    km.multi_lora_gemm(*args, n, r_max)
    assert autotune.report()["decisions"] == []


def _gpu_candidates(table):
    """(path, size, name, config resolved for bf16) of every candidate other than the default."""
    return [(path, size, name, cfg) for path, sets in table.items() for size, cands in sets.items()
            for name, cfg in cands.items() if name != "default"]


@pytest.mark.parametrize("path,size,name,cfg", _gpu_candidates(ki.GEMM_CANDIDATES),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_ia3_candidate_tiles_match_the_reference(path, size, name, cfg):
    """The heaviest variant (prologue, bias, epilogue, reduction, B as [K, N]) with the candidate's tiles."""
    x, _, bias, pro, _ = _ia3_args(m=37, k=40, n=72, seed=1)
    g = torch.Generator().manual_seed(2)
    w, epi, e = torch.randn(40, 72, generator=g), torch.rand(72, generator=g) + 0.5, torch.randn(37, 72, generator=g)
    assert path_for(x.device, x, w, e) == "tma"  # sets up the descriptors' scratch allocator
    c = torch.full((37, 72), float("nan"))
    dl = ki._gemm(x, w, b_kn=True, N=72, K=40, c=c, bias=bias[:1].expand(72), pro=pro, epi=epi, e=e,
                  tuned=(path, ki.tiles_for(cfg, torch.bfloat16)))
    pre = (x.double() * pro.double()) @ w.double() + bias[0].double()
    assert_close(c, pre * epi.double(), torch.float32, f"{size}@{name} C")
    assert_close(dl, (e.double() * pre).sum(0), torch.float32, f"{size}@{name} dl", k=37 * 40)


@pytest.mark.parametrize("path,size,name,cfg", _gpu_candidates(km.GEMM_CANDIDATES),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_multi_lora_candidate_tiles_match_the_reference(path, size, name, cfg):
    args, n, r_max = _multi_args(m=37, k=100, n=70, seed=3)
    assert path_for(args[0].device, args[1]) == "tma"
    out = torch.full((37, 70), float("nan"))
    km.multi_lora_gemm(*args, n, r_max, out=out, tuned=(path, km.tiles_for(cfg, torch.bfloat16)))
    assert_close(out, _multi_reference(*args), torch.float32, f"{size}@{name}")
