"""fastpeft.inject_adapters: placement (series / parallel), PEFT-style name matching, freezing, identity at init."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from fastpeft.inject_adapters import ParallelAdapterLayer, SeriesAdapterLayer, inject_adapters  # noqa: E402
from fastpeft.modules.adapter import BottleneckAdapter  # noqa: E402


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn_out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.pair = TupleOut(d)

    def forward(self, x):
        x = x + self.attn_out(x)
        x = x + self.mlp(x)
        return self.pair(x)[0]


class TupleOut(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x), "extra"


class Toy(nn.Module):
    def __init__(self, d=24, n=2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def _randomise_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up_weight.normal_(0, 0.2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_series_placement_matches_manual_math(backend):
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 5, 24)
    base = model(x)
    inject_adapters(model, after=["attn_out", "pair"], bottleneck=7, kind="series", scaling=0.5, d_model=24, backend=backend)
    assert torch.equal(model(x), base), "adapters start as the identity"
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SeriesAdapterLayer)]
    assert wrapped == ["layers.0.attn_out", "layers.0.pair", "layers.1.attn_out", "layers.1.pair"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert len(trainable) == 4 * 4  # down/up weight and bias per adapter
    _randomise_adapters(model)
    blk = model.layers[0]
    h = blk.attn_out.base_layer(x)
    ad = blk.attn_out.adapter
    z = torch.nn.functional.gelu(h @ ad.down_weight.t() + ad.down_bias)
    expect = h + 0.5 * (z @ ad.up_weight.t() + ad.up_bias)
    torch.testing.assert_close(blk.attn_out(x), expect, rtol=1e-5, atol=1e-5)
    out, extra = blk.pair(x)  # the tuple's first element is adapted, the rest passes through
    assert extra == "extra"
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_parallel_placement_takes_the_input():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(4, 24)
    with pytest.raises(ValueError, match="d_model: cannot infer the width of module 'layers.0.mlp'"):
        inject_adapters(Toy(), around=["mlp"], bottleneck=5)
    inject_adapters(model, around=["mlp"], bottleneck=5, kind="parallel", scaling=4.0, d_model=24, backend="torch")
    layer = model.layers[1].mlp
    assert isinstance(layer, ParallelAdapterLayer)
    _randomise_adapters(model)
    ad = layer.adapter
    z = torch.nn.functional.gelu(x @ ad.down_weight.t() + ad.down_bias)
    expect = layer.base_layer(x) + 4.0 * (z @ ad.up_weight.t() + ad.up_bias)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)


def test_matching_and_errors():
    model = Toy()
    with pytest.raises(ValueError, match="no module of the model matches"):
        inject_adapters(Toy(), after=["nope"], bottleneck=4)
    with pytest.raises(ValueError, match="bottleneck: expected an int >= 1"):
        inject_adapters(Toy(), after=["attn_out"], bottleneck=0)
    with pytest.raises(ValueError, match="kind: expected one of"):
        inject_adapters(Toy(), after=["attn_out"], kind="serial")
    with pytest.raises(ValueError, match="around"):
        inject_adapters(Toy(), after=["attn_out"], around=["mlp"], kind="series")
    # "0" matches only names ending in ".0" (the first Linear of each mlp and the first block), never "10"
    inject_adapters(model, after=["mlp.0"], bottleneck=3)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SeriesAdapterLayer)]
    assert wrapped == ["layers.0.mlp.0", "layers.1.mlp.0"]
    assert model.layers[0].mlp[0].adapter.d_model == 48  # out_features of the wrapped Linear


def test_hf_model_if_available():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    base = model(ids).last_hidden_state
    inject_adapters(model, after=["attention.output", "output"], bottleneck=6, backend="torch")
    n = sum(isinstance(m, SeriesAdapterLayer) for m in model.modules())
    assert n == 4  # BertSelfOutput (attention.output) and BertOutput (output) in each of 2 layers
    torch.testing.assert_close(model(ids).last_hidden_state, base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * (6 * 32 + 6 + 32 * 6 + 32)


# --------------------------------------------------------------------------------------------------
# issue 11: refuse what would nest or be bypassed, all or nothing, repeated calls, copies

def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()}


def test_refuses_targets_inside_adapter_layers_and_repeated_targets():
    model = Toy()
    inject_adapters(model, after=["attn_out"], bottleneck=3, layer_norm=True, backend="torch")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'layers.0.attn_out.base_layer'.*inside 'layers.0.attn_out', a fastpeft "
                                         r"SeriesAdapterLayer"):
        inject_adapters(model, after=["base_layer"], bottleneck=3)
    with pytest.raises(ValueError, match=r"'layers.0.attn_out.adapter.norm'.*inside"):
        inject_adapters(model, after=["adapter.norm"], bottleneck=3, d_model=24)
    with pytest.raises(ValueError, match=r"'layers.0.attn_out' already is a fastpeft SeriesAdapterLayer"):
        inject_adapters(model, after=["attn_out"], bottleneck=3)
    assert _snapshot(model) == before
    import fastpeft

    model = fastpeft.inject_lora(Toy(), ["proj"], r=2)
    with pytest.raises(ValueError, match=r"'layers.0.pair.proj.base_layer'.*inside 'layers.0.pair.proj', a fastpeft "
                                         r"LoRALinear"):
        inject_adapters(model, after=["proj.base_layer"], bottleneck=3)


def test_refuses_targets_a_parent_bypasses():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(24, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    model = Attn()
    with pytest.raises(ValueError, match=r"'mha.out_proj'.*nn.MultiheadAttention.*reads its weight directly"):
        inject_adapters(model, after=["out_proj"], bottleneck=3)
    assert isinstance(model.mha.out_proj, nn.Linear) and type(model.mha.out_proj) is not SeriesAdapterLayer
    inject_adapters(model, after=["mha"], bottleneck=3, d_model=24, backend="torch")  # the attention's output: fine
    model(torch.randn(2, 5, 24)).sum().backward()


def test_all_or_nothing():
    model = nn.ModuleDict({"a": nn.Linear(6, 6), "b": nn.Linear(6, 0)})
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"module 'b'.*d_model: expected an int >= 1, got 0"):
        inject_adapters(model, after=["a", "b"], bottleneck=2)
    assert _snapshot(model) == before
    model = nn.ModuleDict({"a": nn.Linear(6, 6), "b": nn.Linear(6, 4)})
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"around: module 'b' maps 6 features to 4: a parallel adapter needs"):
        inject_adapters(model, around=["a", "b"], bottleneck=2)
    assert _snapshot(model) == before
    with pytest.raises(ValueError, match="activation"):
        inject_adapters(model, after=["a", "b"], bottleneck=2, activation="swish")
    assert _snapshot(model) == before


def test_second_call_keeps_the_first_adapters_trainable():
    model = Toy()
    inject_adapters(model, after=["attn_out"], bottleneck=3, backend="torch")
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    inject_adapters(model, after=["pair"], bottleneck=3, d_model=24, backend="torch")
    now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert first < now and all(".adapter." in n for n in now)
    assert len(now) == 2 * len(first)


def test_copy_pickle_save_and_state_dict_round_trips():
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    model = Toy()
    inject_adapters(model, after=["attn_out"], around=None, bottleneck=3, layer_norm=True, backend="torch")
    inject_adapters(model, around=["proj"], bottleneck=2, kind="parallel", backend="torch")
    _randomise_adapters(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    fresh = Toy()
    inject_adapters(fresh, after=["attn_out"], bottleneck=3, layer_norm=True, backend="torch")
    inject_adapters(fresh, around=["proj"], bottleneck=2, kind="parallel", backend="torch")
    fresh.load_state_dict(model.state_dict())
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False), fresh]
    x = torch.randn(3, 24)
    models = [model] + copies
    for m in models:
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for m in copies:
        assert [n for n, p in m.named_parameters() if p.requires_grad] == \
            [n for n, p in model.named_parameters() if p.requires_grad]
        for (n, p), (_, q) in zip(model.named_parameters(), m.named_parameters()):
            assert torch.equal(p, q), n
