"""fastpeft.targets: one matcher (PEFT's rules) and one set of refusals for every injector (inject_lora,
inject_multi_lora, inject_adapters, galore.enable, load_adapter)."""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import galore
from fastpeft.targets import matches_target

peft_utils = pytest.importorskip("peft.tuners.tuners_utils")
peft = pytest.importorskip("peft")

NAMES = ["q_proj", "model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.0.mlp",
         "model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj_x", "model.layers.0.mlpq_proj", "lm_head",
         "model.layers.1.self_attn.v_proj", "self_attn.q_proj.base_layer"]
CONFIGS = [
    (["q_proj"], None), (["q_proj", "up_proj"], None), (["self_attn.q_proj"], None), (["0.mlp"], None),
    (["mlp"], ["0.mlp"]), (["q_proj", "v_proj"], "model\\.layers\\.1\\..*"), (["q_proj"], ["model.layers.0.self_attn.q_proj"]),
    (r".*\.(q|v)_proj", None), (r"model\.layers\.\d+\.self_attn\.q_proj", ["layers.10.self_attn.q_proj"]),
    (r"q_proj", None), (r".*mlp.*", r".*up_proj.*"), (["lm_head"], []),
]


@pytest.mark.parametrize("target,exclude", CONFIGS)
def test_matcher_agrees_with_peft(target, exclude):
    cfg = peft.LoraConfig(target_modules=target, exclude_modules=exclude)
    for name in NAMES:
        theirs = peft_utils.check_target_module_exists(cfg, name)
        theirs = bool(theirs) and type(theirs).__name__ != "_ExcludedModule"
        assert matches_target(name, target, exclude) == theirs, (name, target, exclude)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.up_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.q_proj(x) + self.v_proj(x)
        return self.up_proj(self.attn(x, x, x)[0])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def _chosen(model, cls):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


@pytest.mark.parametrize("target,exclude", [(["q_proj", "up_proj"], ["0.up_proj"]), (r"\d\.(q|v)_proj", r"1\.v_proj")])
def test_every_injector_selects_the_same_modules(target, exclude):
    want = sorted(n for n, _ in _model().named_modules() if n and matches_target(n, target, exclude))
    assert want and len(want) == 3
    lora = fastpeft.inject_lora(_model(), target, r=2, exclude_modules=exclude)
    assert _chosen(lora, fastpeft.LoRALinear) == want
    g = galore.enable(_model(), target, rank=2, exclude_modules=exclude)
    assert _chosen(g, galore.GaLoreLinear) == want
    sd = {f"{n}.lora_A.weight": torch.zeros(2, 8) for n in want} | {f"{n}.lora_B.weight": torch.zeros(8, 2) for n in want}
    multi = fastpeft.inject_multi_lora(_model(), target, adapters={"a": sd}, exclude_modules=exclude)
    assert _chosen(multi, fastpeft.MultiLoRALinear) == want


def test_excluding_everything_matches_nothing():
    with pytest.raises(ValueError, match="matches no module"):
        fastpeft.inject_lora(_model(), ["q_proj"], exclude_modules=r".*")
    with pytest.raises(ValueError, match="exclude_modules: expected"):
        fastpeft.inject_lora(_model(), ["q_proj"], exclude_modules=[3])
    with pytest.raises(ValueError, match="not a valid regex"):
        galore.enable(_model(), "q_proj(", rank=2)


def test_every_injector_refuses_a_target_inside_a_fused_layer():
    model = fastpeft.inject_lora(_model(), ["q_proj"], r=2)
    inside = r"'0\.q_proj\.base_layer'.*inside '0\.q_proj', a fastpeft LoRALinear.*never change the output"
    with pytest.raises(ValueError, match=inside):
        fastpeft.inject_lora(model, ["base_layer"], r=2)
    with pytest.raises(ValueError, match=inside):
        galore.enable(model, ["0.q_proj.base_layer"], rank=2)
    with pytest.raises(ValueError, match=inside):
        fastpeft.inject_adapters(model, after=["0.q_proj.base_layer"], bottleneck=2)
    with pytest.raises(ValueError, match=inside):
        fastpeft.inject_multi_lora(model, ["0.q_proj.base_layer"], adapters={"a": {}})


def test_every_injector_refuses_multihead_attention_children():
    why = r"'0\.attn\.out_proj'.*nn\.MultiheadAttention.*reads its weight directly"
    with pytest.raises(ValueError, match=why):
        fastpeft.inject_lora(_model(), ["out_proj"], r=2)
    with pytest.raises(ValueError, match=why):
        fastpeft.inject_adapters(_model(), after=["out_proj"], bottleneck=2)
    with pytest.raises(ValueError, match=why):
        fastpeft.inject_multi_lora(_model(), ["out_proj"], adapters={"a": {}})
    with pytest.raises(TypeError, match="expected an nn.Linear"):  # a Linear subclass: refused before
        galore.enable(_model(), ["out_proj"], rank=2)


def test_galore_refuses_an_instance_forward():
    model = _model()
    model[0].q_proj.forward = lambda x: x
    with pytest.raises(ValueError, match=r"'0\.q_proj' has a forward of its own"):
        galore.enable(model, ["q_proj"], rank=2)
    assert not any(isinstance(m, galore.GaLoreLinear) for m in model.modules())


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_every_injector_keeps_earlier_adapters_trainable():
    model = fastpeft.inject_adapters(_model(), after=["up_proj"], bottleneck=2, backend="torch")
    adapters = _trainable(model)
    fastpeft.inject_lora(model, ["q_proj"], r=2)
    lora = _trainable(model) - adapters
    assert adapters <= _trainable(model) and lora == {f"{i}.q_proj.lora_{ab}" for i in "01" for ab in "AB"}
    sd = {f"{i}.v_proj.lora_{ab}.weight": torch.zeros((2, 8) if ab == "A" else (8, 2)) for i in "01" for ab in "AB"}
    fastpeft.inject_multi_lora(model, ["v_proj"], adapters={"a": sd})
    assert adapters | lora <= _trainable(model)


def test_injectors_keep_peft_adapters_trainable():
    torch.manual_seed(0)
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["v_proj"]))
    theirs = _trainable(model)
    assert theirs and all("lora_" in n for n in theirs)
    fastpeft.inject_lora(model, ["q_proj"], r=2)
    assert theirs < _trainable(model)
    with pytest.raises(ValueError, match=r"inside .*a PEFT adapter layer \(Linear\)"):
        fastpeft.inject_lora(model, ["0.v_proj.base_layer"], r=2)


def test_lora_and_galore_go_inside_a_series_or_parallel_wrapper():
    """A series/parallel adapter layer calls its base layer, so LoRA, multi-LoRA and GaLore on Linears inside it
    act and train; only a second bottleneck adapter inside it is refused (adapters would nest)."""
    model = fastpeft.inject_adapters(_model(), after=["0"], bottleneck=2, d_model=8, backend="torch")  # wraps Block 0
    assert isinstance(model[0], fastpeft.SeriesAdapterLayer)
    x = torch.randn(3, 8)
    before = model(x).detach()
    fastpeft.inject_lora(model, ["q_proj"], r=2)
    assert _chosen(model, fastpeft.LoRALinear) == ["0.base_layer.q_proj", "1.q_proj"]
    torch.nn.init.normal_(model[0].base_layer.q_proj.lora_B)
    y = model(x)
    assert not torch.allclose(y, before)  # the LoRA inside the wrapper changes the output
    y.sum().backward()
    assert model[0].base_layer.q_proj.lora_A.grad is not None
    galore.enable(model, ["v_proj"], rank=2)
    assert _chosen(model, galore.GaLoreLinear) == ["0.base_layer.v_proj", "1.v_proj"]
    with pytest.raises(ValueError, match=r"inside '0', a fastpeft SeriesAdapterLayer"):
        fastpeft.inject_adapters(model, after=["up_proj"], bottleneck=2, d_model=8, backend="torch")
