"""Outputs users may modify: every op's and module's output, changed in place (relu_, +=) in training, gives
exact gradients against float64; and a patched PEFT model keeps PEFT's layer names in repr.

A custom autograd.Function that returns a view of a tensor made inside it cannot be modified in place
(autograd raises); model code does exactly that (nn.ReLU(inplace=True), `result += ...` as in PEFT's AdaLoRA).
Both backends; "triton" runs under TRITON_INTERPRET=1 on the CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpeft
import fastpeft.galore as fg
from tolerances import assert_close

from conftest import DEVICE

BACKENDS = ["torch", "triton"]
INPLACE = ["relu_", "add_"]
K, N, R, A = 40, 24, 3, 5  # in, out, rank, bottleneck: small and odd-sized


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)


def _act64(z, act):
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[act](z)


# ------------------------------------------------------------------------------------------ the cases
# each builder(backend, gen) -> (forward(x) -> y, x, {name: trainable tensor}, reference(x64, p64) -> y64, lead)
# where p64 holds float64 copies of the trainable tensors and of the frozen ones the reference needs


def lora_op(backend, gen):
    w, b = _rand(gen, N, K, scale=K ** -0.5), _rand(gen, N)
    a, lb = _rand(gen, R, K, scale=K ** -0.5), _rand(gen, N, R, scale=0.5)
    params = {"lora_a": a, "lora_b": lb, "bias": b}

    def fwd(x):
        return fastpeft.lora_linear(x, w, params["lora_a"], params["lora_b"], 2.0, bias=params["bias"], backend=backend)

    def ref(x, p):
        return x @ w.double().t() + 2.0 * (x @ p["lora_a"].t()) @ p["lora_b"].t() + p["bias"]
    return fwd, params, ref, (2, 7)


def adapter_op(backend, gen):
    params = {"down_w": _rand(gen, A, K, scale=K ** -0.5), "down_b": _rand(gen, A), "up_w": _rand(gen, K, A),
              "up_b": _rand(gen, K)}

    def fwd(x):
        return fastpeft.bottleneck_adapter(x, params["down_w"], params["down_b"], params["up_w"], params["up_b"], 0.5,
                                           "gelu", backend=backend)

    def ref(x, p):
        return x + 0.5 * (_act64(x @ p["down_w"].t() + p["down_b"], "gelu") @ p["up_w"].t() + p["up_b"])
    return fwd, params, ref, (7,)


def adapter_parallel_op(backend, gen):
    params = {"down_w": _rand(gen, A, K, scale=K ** -0.5), "up_w": _rand(gen, K, A), "residual": _rand(gen, 3, 1, K)}

    def fwd(x):  # the residual expanded (stride 0) over the sequence
        return fastpeft.bottleneck_adapter(x, params["down_w"], None, params["up_w"], None, 1.5, "relu",
                                           residual=params["residual"].expand(x.shape), backend=backend)

    def ref(x, p):
        return p["residual"] + 1.5 * (_act64(x @ p["down_w"].t(), "relu") @ p["up_w"].t())
    return fwd, params, ref, (3, 4)


def ia3_op(mode):
    def build(backend, gen):
        w, b = _rand(gen, N, K, scale=K ** -0.5), _rand(gen, N)
        params = {"scale": (torch.rand(N if mode == "output" else K, generator=gen) + 0.5).to(DEVICE)}
        fwd = lambda x: fastpeft.ia3_linear(x, w, b, params["scale"], mode, backend=backend)  # noqa: E731
        if mode == "output":
            ref = lambda x, p: (x @ w.double().t() + b.double()) * p["scale"]  # noqa: E731
        else:
            ref = lambda x, p: (x * p["scale"]) @ w.double().t() + b.double()  # noqa: E731
        return fwd, params, ref, (5,)
    return build


def _multi_ref(w, bias, ids_tok, scal, ranks, offsets):
    def ref(x, p):
        x2 = x.reshape(-1, K)
        y = x2 @ w.double().t() + bias.double()
        for j, (r, o, s) in enumerate(zip(ranks, offsets, scal)):
            mask = (ids_tok == j).double()[:, None]
            y = y + mask * s * (x2 @ p["lora_a"][o:o + r].t()) @ p["lora_b"][:, o:o + r].t()
        return y.reshape(*x.shape[:-1], N)
    return ref


def multi_op(backend, gen):
    w, bias = _rand(gen, N, K, scale=K ** -0.5), _rand(gen, N)
    ranks, offsets, scal = [3, 2], [0, 3], [0.5, -1.25]
    params = {"lora_a": _rand(gen, 5, K, scale=K ** -0.5), "lora_b": _rand(gen, N, 5, scale=0.5)}
    ids = torch.tensor([0, -1, 1, 1, 0, 1, -1]).to(DEVICE)

    def fwd(x):
        return fastpeft.multi_lora_linear(x, w, params["lora_a"], params["lora_b"], ids, scal, ranks, offsets,
                                          bias=bias, backend=backend)
    return fwd, params, _multi_ref(w, bias, ids.cpu(), scal, ranks, offsets), (7,)


def galore_op(backend, gen):
    lin = nn.Linear(K, N).to(DEVICE)
    fg.enable(nn.Sequential(lin), ["0"], rank=2, update_proj_gap=5, backend=backend)
    params = {"bias": lin.bias}
    fwd = lambda x: lin(x)  # noqa: E731
    ref = lambda x, p: x @ lin.weight.detach().double().t() + p["bias"]  # noqa: E731
    return fwd, params, ref, (2, 3)


def _randomize(module, gen):
    with torch.no_grad():  # trained-looking values: B, up-projection and scales away from their identity init
        for n, p in module.named_parameters():
            if p.requires_grad:
                if "ia3_scale" in n:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _module_case(make, ref_fn, lead=(2, 5)):
    def build(backend, gen):
        mod = make(backend, gen)
        _randomize(mod, gen)
        params = {n: p for n, p in mod.named_parameters() if p.requires_grad}
        frozen = {n: p for n, p in mod.named_parameters() if not p.requires_grad}
        ref = lambda x, p: ref_fn(mod, x, {**{n: t.detach().double() for n, t in frozen.items()}, **p})  # noqa: E731
        return mod, params, ref, lead
    return build


def _lora_module(backend, gen):
    return fastpeft.LoRALinear(nn.Linear(K, N).to(DEVICE), r=R, alpha=6, backend=backend)


def _lora_module_ref(mod, x, p):
    return x @ p["base_layer.weight"].t() + p["base_layer.bias"] + 2.0 * (x @ p["lora_A"].t()) @ p["lora_B"].t()


def _adapter_module(backend, gen):
    return fastpeft.BottleneckAdapter(K, A, activation="silu", scaling=0.75, device=DEVICE, backend=backend)


def _adapter_module_ref(mod, x, p):
    return x + 0.75 * (_act64(x @ p["down_weight"].t() + p["down_bias"], "silu") @ p["up_weight"].t() + p["up_bias"])


def _ia3_module(backend, gen):
    return fastpeft.IA3Linear(nn.Linear(K, N).to(DEVICE), scale="input", backend=backend)


def _ia3_module_ref(mod, x, p):
    return (x * p["ia3_scale"]) @ p["base_layer.weight"].t() + p["base_layer.bias"]


def _multi_module(backend, gen):
    mod = fastpeft.MultiLoRALinear(nn.Linear(K, N).to(DEVICE), num_adapters=2, r=R, alpha=6, backend=backend)
    ids = torch.tensor([1, 0]).to(DEVICE)  # per sequence, x [2, 5, K]

    class WithIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mod

        def forward(self, x):
            return self.inner(x, ids)
    return WithIds()


def _multi_module_ref(mod, x, p):
    ids_tok = torch.tensor([1, 0]).repeat_interleave(x.shape[1])
    x2 = x.reshape(-1, K)
    y = x2 @ p["inner.base_layer.weight"].t() + p["inner.base_layer.bias"]
    for j in range(2):
        sl = slice(j * R, (j + 1) * R)
        mask = (ids_tok == j).double()[:, None]
        y = y + mask * 2.0 * (x2 @ p["inner.lora_A"][sl].t()) @ p["inner.lora_B"][:, sl].t()
    return y.reshape(*x.shape[:-1], N)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(K, K)

    def forward(self, x):
        return self.mlp(x)


def _series_layer(backend, gen):
    torch.manual_seed(0)
    return fastpeft.inject_adapters(Block().to(DEVICE), after=["mlp"], bottleneck=A, activation="relu",
                                    backend=backend)


def _series_layer_ref(mod, x, p):
    h = x @ p["mlp.base_layer.weight"].t() + p["mlp.base_layer.bias"]
    return h + (_act64(h @ p["mlp.adapter.down_weight"].t() + p["mlp.adapter.down_bias"], "relu")
                @ p["mlp.adapter.up_weight"].t() + p["mlp.adapter.up_bias"])


def _parallel_layer(backend, gen):
    torch.manual_seed(0)
    return fastpeft.inject_adapters(Block().to(DEVICE), around=["mlp"], kind="parallel", bottleneck=A,
                                    activation="gelu", backend=backend)


def _parallel_layer_ref(mod, x, p):
    h = x @ p["mlp.base_layer.weight"].t() + p["mlp.base_layer.bias"]
    return h + (_act64(x @ p["mlp.adapter.down_weight"].t() + p["mlp.adapter.down_bias"], "gelu")
                @ p["mlp.adapter.up_weight"].t() + p["mlp.adapter.up_bias"])


def _strided(gen, rows, cols, scale=1.0):
    """A [rows, cols] leaf that is a transposed view (column-major) of its storage."""
    return _rand(gen, cols, rows, scale=scale).t()


def lora_cublas_op(backend, gen):
    """The cublas backend (cuBLAS addmm + Triton skinny kernels; the interpreter on the CPU) whatever `backend` is,
    with W0 transposed in memory, A sliced and the bias expanded (stride 0)."""
    w = _strided(gen, N, K, scale=K ** -0.5)
    params = {"lora_a": _rand(gen, R, 2 * K, scale=K ** -0.5)[:, ::2], "lora_b": _strided(gen, N, R, scale=0.5),
              "bias": _rand(gen, 1)}

    def fwd(x):
        return fastpeft.lora_linear(x, w, params["lora_a"], params["lora_b"], 2.0, bias=params["bias"].expand(N),
                                    backend="cublas")

    def ref(x, p):
        return x @ w.double().t() + 2.0 * (x @ p["lora_a"].t()) @ p["lora_b"].t() + p["bias"].expand(N)
    return fwd, params, ref, (2, 7)


def dora_op(backend, gen):
    """DoRA with W0 and B transposed in memory; the norm detached as PEFT detaches it."""
    w = _strided(gen, N, K, scale=K ** -0.5)
    params = {"lora_a": _rand(gen, R, K, scale=K ** -0.5), "lora_b": _strided(gen, N, R, scale=0.5),
              "magnitude": (_rand(gen, N) * 0.2 + 1.0), "bias": _rand(gen, N)}

    def fwd(x):
        return fastpeft.dora_linear(x, w, params["lora_a"], params["lora_b"], params["magnitude"], 1.5,
                                    bias=params["bias"], backend=backend)

    def ref(x, p):
        merged = w.double() + 1.5 * p["lora_b"] @ p["lora_a"]
        g = p["magnitude"] / merged.norm(dim=1).detach()
        return g * (x @ merged.t()) + p["bias"]
    return fwd, params, ref, (3, 5)


def qlora_op(backend, gen):
    """QLoRA over a bitsandbytes NF4 W0 (double quant), adapters sliced; the reference from bitsandbytes' own
    (flat-indexed) dequantize in float64."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    deq = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    packed, st = bnb_f.quantize_4bit(_rand(gen, N, K, scale=K ** -0.5), blocksize=64, quant_type="nf4",
                                     compress_statistics=True)
    amax = bnb_f.dequantize_blockwise(st.absmax, st.state2) + st.offset
    w64 = deq(packed.reshape(-1), amax, st.code, st.blocksize, tuple(st.shape), torch.float32).double().cpu()
    params = {"lora_a": _rand(gen, R, 2 * K, scale=K ** -0.5)[:, 1::2], "lora_b": _strided(gen, N, R, scale=0.5),
              "bias": _rand(gen, N)}

    def fwd(x):
        return fastpeft.qlora_linear(x, packed, st, params["lora_a"], params["lora_b"], 2.0, bias=params["bias"],
                                     backend=backend)

    def ref(x, p):
        return x @ w64.t() + 2.0 * (x @ p["lora_a"].t()) @ p["lora_b"].t() + p["bias"]
    return fwd, params, ref, (2, 3)


CASES = {
    "lora_linear": lora_op,
    "lora_linear_cublas": lora_cublas_op,
    "dora_linear": dora_op,
    "qlora_linear": qlora_op,
    "bottleneck_adapter": adapter_op,
    "bottleneck_adapter_parallel": adapter_parallel_op,
    "ia3_linear_output": ia3_op("output"),
    "ia3_linear_input": ia3_op("input"),
    "multi_lora_linear": multi_op,
    "galore_linear": galore_op,
    "LoRALinear": _module_case(_lora_module, _lora_module_ref),
    "BottleneckAdapter": _module_case(_adapter_module, _adapter_module_ref),
    "IA3Linear": _module_case(_ia3_module, _ia3_module_ref),
    "MultiLoRALinear": _module_case(_multi_module, _multi_module_ref),
    "SeriesAdapterLayer": _module_case(_series_layer, _series_layer_ref),
    "ParallelAdapterLayer": _module_case(_parallel_layer, _parallel_layer_ref),
}


@pytest.mark.parametrize("inplace", INPLACE)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_output_modified_in_place_in_training(case, backend, inplace):
    gen = _gen(sum(map(ord, case)))
    fwd, params, ref, lead = CASES[case](backend, gen)
    for t in params.values():
        t.requires_grad_(True)
    x = _rand(gen, *lead, K).requires_grad_(True)
    y = fwd(x)
    other = _rand(gen, *y.shape).requires_grad_(True)
    assert y.requires_grad and y.grad_fn is not None
    if inplace == "relu_":
        out = y.relu_()  # nn.ReLU(inplace=True)
        assert out is y
    else:
        y += other  # `result += ...` as PEFT's AdaLoRA and many model codes do
        out = y
    dy = _rand(gen, *out.shape)
    out.backward(dy)

    x64 = x.detach().double().cpu().requires_grad_(True)
    p64 = {n: t.detach().double().cpu().requires_grad_(True) for n, t in params.items()}
    o64 = other.detach().double().cpu().requires_grad_(True)
    y64 = ref(x64, p64)
    y64 = F.relu(y64) if inplace == "relu_" else y64 + o64
    y64.backward(dy.double().cpu())
    assert_close(out, y64, torch.float32, f"{case}: output after {inplace}")
    assert_close(x.grad, x64.grad, torch.float32, f"{case}: dx")
    for n, t in params.items():
        assert t.grad is not None, f"{case}: d{n} is None"
        assert_close(t.grad, p64[n].grad, torch.float32, f"{case}: d{n}")
    if inplace == "add_":
        assert_close(other.grad, o64.grad, torch.float32, f"{case}: d(other)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_output_modified_in_place(backend):
    # without autograd (decode) the output is modified in place too, and that is all it is
    gen = _gen(5)
    fwd, params, ref, lead = lora_op(backend, gen)
    x = _rand(gen, *lead, K)
    with torch.no_grad():
        y = fwd(x)
        y.relu_()
        y += 1.0
    x64 = x.double().cpu()
    assert_close(y, F.relu(ref(x64, {n: t.double().cpu() for n, t in params.items()})) + 1.0, torch.float32, "y")


# ------------------------------------------------------------------------------------------ patch_peft

class TinyPeftBase(nn.Module):
    """q_proj followed by an in-place ReLU, v_proj followed by `+=` (AdaLoRA-style), then a head."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(K, N)
        self.v_proj = nn.Linear(K, N)
        self.act = nn.ReLU(inplace=True)
        self.skip = nn.Linear(K, N, bias=False)
        self.head = nn.Linear(N, 3)

    def forward(self, x):
        h = self.act(self.q_proj(x))
        v = self.v_proj(x)
        v += self.skip(x)
        return self.head(h * v)


def _peft_model(seed=0):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    pm = peft.get_peft_model(TinyPeftBase(), peft.LoraConfig(r=R, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    gen = _gen(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # B non-zero so that the adapter term is tested
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pm.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_peft_layer_followed_by_in_place_ops(backend):
    import copy

    pm = _peft_model()
    ref = copy.deepcopy(pm).double().cpu()  # PEFT's own path, float64
    fastpeft.patch_peft(pm, backend=backend)
    gen = _gen(7)
    x = _rand(gen, 2, 5, K)
    out = pm(x)
    out.backward(torch.ones_like(out))
    y64 = ref(x.double().cpu())
    y64.backward(torch.ones_like(y64))
    assert_close(out, y64, torch.float32, "patched PEFT model output")
    grads64 = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n}: no gradient"
            assert_close(p.grad, grads64[n], torch.float32, f"d{n}")


def test_patched_peft_repr_keeps_peft_names():
    pm = _peft_model()
    before = repr(pm)
    assert "lora.Linear(" in before
    fastpeft.patch_peft(pm)
    after = repr(pm)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert after == before, f"patch_peft changed the model's repr: {changed[:2]}"
    fastpeft.unpatch_peft(pm)
    assert repr(pm) == before


@pytest.mark.parametrize("inplace", INPLACE)
@pytest.mark.parametrize("case", ["ia3_linear_output", "ia3_linear_input", "multi_lora_linear", "galore_linear"])
def test_cublas_output_modified_in_place_in_training(case, inplace):
    """The ops' cuBLAS paths (cuBLAS GEMMs + Triton kernels; torch and the interpreter on the CPU), as above."""
    test_output_modified_in_place_in_training(case, "cublas", inplace)
