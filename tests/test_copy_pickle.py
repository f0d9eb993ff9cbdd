"""Copies, pickles and checkpoints of every fastpeft module and of models after inject_lora, inject_adapters,
inject_multi_lora, galore.enable and patch_peft: the copy trains identically to the original.

Each case is trained one step (so the optimizer has state and GaLore a basis), then copied with
copy.deepcopy, pickle, torch.save/torch.load of the full module (weights_only=False) or a state_dict round
trip (a weights-only checkpoint of model and optimizer) into a freshly built twin with another random init;
model and optimizer are copied together. Then both
train three more steps on the same data and seeds (dropout seeds and GaLore's randomized refresh draw from
torch's generator; the GaLore cases refresh their projector at step 2): losses, outputs, every gradient
and every parameter must be equal bit for bit, and the copy must share no storage with the original.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fastpeft
import fastpeft.galore as fg
from fastpeft.optim import GaLoreAdamW

from conftest import DEVICE

HOWS = ["deepcopy", "pickle", "torch_save", "state_dict"]
D = 16


class Net(nn.Module):
    """A small transformer-like block: q/v projections, an MLP, a head (top level, so pickle finds it)."""

    def __init__(self, d=D):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 24), nn.GELU(), nn.Linear(24, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.q_proj(x) * torch.sigmoid(self.v_proj(x))
        h = h + self.mlp(h)
        return self.head(h)


def _randomize(model, seed):
    # trained-looking adapters (B, up-projections, IA3 vectors away from their identity init)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "ia3" in n else 0.0))


def _adam(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


# ------------------------------------------------------------------------------------------ cases
# build(backend, seed) -> (model, optimizer); call(model, x) -> output; x_shape


class Case:
    x_shape = (2, 5, D)

    def call(self, model, x):
        return model(x)


class LoRALinearCase(Case):
    x_shape = (2, 5, 40)

    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = fastpeft.LoRALinear(nn.Linear(40, 24), r=3, alpha=6, dropout=0.1, backend=backend).to(DEVICE)
        _randomize(m, seed)
        return m, _adam(m)


class BottleneckAdapterCase(Case):
    x_shape = (2, 5, 40)

    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = fastpeft.BottleneckAdapter(40, 5, activation="silu", scaling=0.5, layer_norm=True, device=DEVICE,
                                       backend=backend)
        _randomize(m, seed)
        return m, _adam(m)


class IA3LinearCase(Case):
    x_shape = (2, 5, 40)

    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = fastpeft.IA3Linear(nn.Linear(40, 24), scale="output", backend=backend).to(DEVICE)
        _randomize(m, seed)
        return m, _adam(m)


class MultiLoRALinearCase(Case):
    x_shape = (3, 5, 40)

    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = fastpeft.MultiLoRALinear(nn.Linear(40, 24), num_adapters=3, r=3, alpha=6, backend=backend).to(DEVICE)
        _randomize(m, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        m.load_adapter(1, torch.randn(2, 40, generator=gen).to(DEVICE), torch.randn(24, 2, generator=gen).to(DEVICE),
                       alpha=5.0, name="rank-two")  # host-side slot state (ranks, names) must survive the copy
        return m, _adam(m)

    def call(self, model, x):
        return model(x, torch.tensor([2, -1, 1]).to(DEVICE))


class InjectLoraCase(Case):
    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = fastpeft.inject_lora(Net().to(DEVICE), ["q_proj", "v_proj"], r=3, alpha=6, dropout=0.1, backend=backend)
        _randomize(m, seed)
        return m, _adam(m)


class SeriesAdaptersCase(Case):
    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = fastpeft.inject_adapters(Net().to(DEVICE), after=["mlp"], bottleneck=5, d_model=D, backend=backend)
        assert isinstance(m.mlp, fastpeft.SeriesAdapterLayer)
        _randomize(m, seed)
        return m, _adam(m)


class ParallelAdaptersCase(Case):
    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = fastpeft.inject_adapters(Net().to(DEVICE), around=["q_proj"], kind="parallel", bottleneck=5,
                                     backend=backend)
        assert isinstance(m.q_proj, fastpeft.ParallelAdapterLayer)
        _randomize(m, seed)
        return m, _adam(m)


class InjectMultiLoraCase(Case):
    def build(self, backend, seed):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        adapters = {}
        for name, r in (("a", 3), ("b", 2)):
            adapters[name] = {f"{mod}.lora_{ab}.weight": torch.randn(*(shape), generator=gen) * 0.3
                              for mod in ("q_proj", "v_proj") for ab, shape in (("A", (r, D)), ("B", (D, r)))}
        m = fastpeft.inject_multi_lora(Net().to(DEVICE), ["q_proj", "v_proj"], adapters, alpha=4.0, backend=backend)
        return m, _adam(m)

    def call(self, model, x):
        return model(x, adapter_names=["b", "a"])


class GaLoreCase(Case):
    x_shape = (9, 20)

    def build(self, backend, seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(20, 33), nn.Tanh(), nn.Linear(33, 17)).to(DEVICE)
        fg.enable(m, ["0", "2"], rank=3, update_proj_gap=2, scale=0.5, backend=backend)
        return m, GaLoreAdamW(m.parameters(), lr=1e-2, weight_decay=0.01, backend=backend)


class PatchPeftCase(Case):
    def build(self, backend, seed):
        peft = pytest.importorskip("peft")
        torch.manual_seed(seed)
        pm = peft.get_peft_model(Net(), peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.1,
                                                       target_modules=["q_proj", "v_proj"])).to(DEVICE)
        _randomize(pm, seed)
        fastpeft.patch_peft(pm, backend=backend)
        return pm, _adam(pm)


CASES = {c.__name__[:-4]: c() for c in (LoRALinearCase, BottleneckAdapterCase, IA3LinearCase, MultiLoRALinearCase,
                                        InjectLoraCase, SeriesAdaptersCase, ParallelAdaptersCase, InjectMultiLoraCase,
                                        GaLoreCase, PatchPeftCase)}


# ------------------------------------------------------------------------------------------ the check


def train_step(case, model, opt, t):
    """One step on data and seeds fixed by t; returns (loss, output, {name: gradient})."""
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(*case.x_shape, generator=gen).to(DEVICE)
    torch.manual_seed(1000 + t)  # dropout seeds, GaLore's sketch seed
    model.train()
    y = case.call(model, x)
    target = torch.randn(y.shape, generator=gen).to(DEVICE)
    loss = ((y - target) ** 2).mean()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), y.detach(), grads


def make_copy(how, case, model, opt, backend):
    if how == "deepcopy":
        return copy.deepcopy((model, opt))
    if how == "pickle":
        return pickle.loads(pickle.dumps((model, opt)))
    if how == "torch_save":
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    # a checkpoint (weights only) loaded into a twin with another random init: everything must come from it
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    other, opt2 = case.build(backend, seed=77)
    missing, unexpected = other.load_state_dict(ckpt["model"])
    assert not missing and not unexpected, (missing, unexpected)
    opt2.load_state_dict(ckpt["opt"])
    return other, opt2


def _storages(model):
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}


def check_copy_trains_identically(case_name, backend, how):
    case = CASES[case_name]
    model, opt = case.build(backend, seed=0)
    train_step(case, model, opt, 0)
    other, opt2 = make_copy(how, case, model, opt, backend)
    assert other is not model and type(other) is type(model)
    assert repr(other) == repr(model)
    assert not _storages(model) & _storages(other), "the copy shares parameter or buffer storage with the original"
    assert [n for n, _ in other.named_parameters()] == [n for n, _ in model.named_parameters()]
    for t in range(1, 4):
        la, ya, ga = train_step(case, model, opt, t)
        lb, yb, gb = train_step(case, other, opt2, t)
        assert torch.equal(ya, yb), f"step {t}: outputs differ (max {(ya - yb).abs().max():.3g})"
        assert torch.equal(la, lb), f"step {t}: losses {la} != {lb}"
        for n, g in ga.items():
            assert (g is None) == (gb[n] is None), f"step {t}: {n}: gradient {g is None} vs copy's {gb[n] is None}"
            assert g is None or torch.equal(g, gb[n]), f"step {t}: {n}: gradients differ"
    for (n, pa), pb in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(pa, pb), f"{n}: parameters differ after training"
    for (n, ba), bb in zip(model.named_buffers(), other.buffers()):
        assert torch.equal(ba, bb), f"{n}: buffers differ after training"


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("case", list(CASES))
def test_copy_trains_identically(case, how):
    check_copy_trains_identically(case, "torch", how)


@pytest.mark.parametrize("case", list(CASES))
def test_copy_trains_identically_triton(case):
    check_copy_trains_identically(case, "triton", "deepcopy")


def test_galore_copy_before_any_step():
    # a copy made right after enable() (no basis yet) trains like the original, through the step-0 refresh
    case = CASES["GaLore"]
    model, _ = case.build("torch", seed=3)
    other = copy.deepcopy(model)
    opts = [GaLoreAdamW(m.parameters(), lr=1e-2, backend="torch") for m in (model, other)]
    for t in range(3):
        la, _, _ = train_step(case, model, opts[0], t)
        lb, _, _ = train_step(case, other, opts[1], t)
        assert torch.equal(la, lb), t
    for pa, pb in zip(model.parameters(), other.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("case", ["MultiLoRALinear", "InjectMultiLora"])
def test_multi_lora_copy_keeps_slots_and_names(case):
    model, opt = CASES[case].build("torch", seed=0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [(a, b) for a, b in zip(model.modules(), other.modules()) if isinstance(a, fastpeft.MultiLoRALinear)]
        assert layers
        for a, b in layers:
            assert b.ranks == a.ranks and b.adapter_names == a.adapter_names
            assert b.free_slot() == a.free_slot()
