"""torch.compile(fullgraph=True) of every op through its torch.library ops (fastpeft/ops/*_custom_op.py).

fullgraph=True makes any graph break an error, so every compile here also proves there is none. Most cases
use the "aot_eager" compiler (Dynamo + AOTAutograd + the fake kernels, no code generation: seconds on a
CPU); one case runs Inductor end to end. CPU: the PyTorch backend (and the Triton kernels under the
interpreter); CUDA: the Triton kernels in every dtype. torch.library.opcheck of the ops: test_opcheck.py.
"""
import copy

import pytest
import torch
from torch import nn

from fastpeft import BottleneckAdapter, IA3Linear, LoRALinear, MultiLoRALinear, galore, lora_linear, multi_lora_linear
from fastpeft.ops import galore_linear_custom_op, lora_linear_custom_op  # noqa: F401  (registers the ops)
from fastpeft.ops.galore_linear import galore_linear
from fastpeft.optim import GaLoreAdamW
from reference_lora import reference_with_grads
from tolerances import assert_close

from conftest import DEVICE

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])


def _rnd(*shape, dtype=torch.float32, scale=1.0, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _rnd(9, 3, 21, dtype=dtype, g=g).transpose(0, 1)  # [3, 9, 21], not contiguous
    w = _rnd(35, 21, dtype=dtype, scale=21 ** -0.5, g=g)
    a = _rnd(6, 21, dtype=dtype, scale=21 ** -0.5, g=g)
    b = _rnd(35, 6, dtype=dtype, scale=6 ** -0.5, g=g)  # B non-zero: the low-rank term counts
    bias = _rnd(35, dtype=dtype, g=g)
    return x, w, a, b, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_compiled_functional_matches_float64_reference(backend, dtype, p):
    x, w, a, b, bias = _inputs(dtype)
    x, a, b, bias = (t.detach().requires_grad_() for t in (x, a, b, bias))
    dy = _rnd(3, 9, 35, dtype=dtype, g=torch.Generator().manual_seed(5))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, a, b, bias):
        return lora_linear(x, w, a, b, 0.75, bias=bias, dropout_p=p, seed=1234, backend=backend)

    y = f(x, w, a, b, bias)
    y.backward(dy)
    ref_y, (gx, _, ga, gb, gbias) = reference_with_grads(x, w, a, b, bias, 0.75, dy, p=p, seed=1234)
    for what, got, exp in (("y", y, ref_y), ("dx", x.grad, gx), ("dA", a.grad, ga), ("dB", b.grad, gb),
                           ("dbias", bias.grad, gbias)):
        assert got.dtype == dtype, what
        assert_close(got, exp, dtype, f"compiled {backend} {what}")


def _two_layer_model(dropout=0.0, backend=None):
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(21, 33), r=4, alpha=8, dropout=dropout, backend=backend), nn.GELU(),
                          LoRALinear(nn.Linear(33, 7), r=3, alpha=3, dropout=dropout, backend=backend)).to(DEVICE)
    for m in (model[0], model[2]):
        nn.init.normal_(m.lora_B, std=0.3)
    return model


def _reference_forward(model, x):
    """The two-layer model's math in float64, written out (no fastpeft op code)."""
    def layer(m, h):
        return (h @ m.weight.double().t() + m.bias.double()
                + m.scaling * (h @ m.lora_A.double().t()) @ m.lora_B.double().t())
    return layer(model[2], nn.functional.gelu(layer(model[0], x.double())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_matches_float64_reference(backend):
    model = _two_layer_model(backend=backend)
    ref = copy.deepcopy(model)
    x = _rnd(2, 5, 21, g=torch.Generator().manual_seed(1)).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    y64 = _reference_forward(ref, x64)
    y64.square().sum().backward()
    assert_close(y, y64, torch.float32, "compiled model output")
    assert_close(x.grad, x64.grad, torch.float32, "compiled model dx")
    for (n, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert_close(p.grad, p_ref.grad, torch.float32, f"compiled model grad of {n}")


def test_compiled_dropout_draws_a_fresh_seed_each_call():
    """The seed is drawn inside the graph (no .item(), no baked-in constant): a new mask every call,
    reproducible with torch.manual_seed, and none in eval mode."""
    model = _two_layer_model(dropout=0.5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _rnd(4, 21, g=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y1, y2 = compiled(x), compiled(x)
        assert not torch.allclose(y1, y2)
        torch.manual_seed(11)
        y3 = compiled(x)
        torch.manual_seed(11)
        y4 = compiled(x)
        assert torch.equal(y3, y4)
        model.eval()
        assert_close(compiled(x), _reference_forward(model, x), torch.float32, "compiled eval output")


def test_patched_peft_model_compiles_without_graph_breaks():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from fastpeft.peft_compat import patch_peft

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).to(DEVICE),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.2)
    ref = copy.deepcopy(pm).double()
    patch_peft(pm)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    loss = torch.compile(pm, fullgraph=True, backend="aot_eager")(ids, labels=ids).loss
    loss.backward()
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    assert_close(loss, ref_loss, torch.float32, "compiled PEFT loss")
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert_close(grads[n], p.grad, torch.float32, f"compiled PEFT grad of {n}")


def test_inductor_end_to_end():
    """One small case through Inductor's code generation (slow to compile on a 2-core CPU: keep it one)."""
    backend = "triton" if DEVICE == "cuda" else "torch"
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(21, 33), r=4, alpha=8, backend=backend).to(DEVICE)
    nn.init.normal_(layer.lora_B, std=0.3)
    x = _rnd(2, 5, 21, g=torch.Generator().manual_seed(1)).requires_grad_()
    y = torch.compile(layer, fullgraph=True, backend="inductor")(x)
    dy = _rnd(2, 5, 33, g=torch.Generator().manual_seed(6))
    y.backward(dy)
    ref_y, (gx, _, ga, gb, _) = reference_with_grads(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias,
                                                     layer.scaling, dy)
    assert_close(y, ref_y, torch.float32, "inductor y")
    assert_close(x.grad, gx, torch.float32, "inductor dx")
    assert_close(layer.lora_A.grad, ga, torch.float32, "inductor dA")
    assert_close(layer.lora_B.grad, gb, torch.float32, "inductor dB")


def test_compiled_bad_input_still_raises():
    x, w, a, b, bias = _inputs(torch.float32)

    def f(x, a, scaling):
        return lora_linear(x, w, a, b, scaling, bias=bias)

    msg = r"lora_a: expected shape \[r, 21\].*got \(6, 20\)"
    with pytest.raises(ValueError, match=msg):  # graph break, then eager raises
        torch.compile(f, backend="aot_eager")(x, a[:, :20], 0.5)
    with pytest.raises(Exception, match=msg):  # fullgraph: Dynamo reports the ValueError it traced
        torch.compile(f, fullgraph=True, backend="aot_eager")(x, a[:, :20], 0.5)


def test_recompiled_scalars_stay_in_graph_and_are_checked():
    """A second scaling/dropout value recompiles with the floats symbolic (automatic dynamic): still one
    graph, and a non-finite value is still refused before any kernel runs."""
    x, w, a, b, bias = _inputs(torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, scaling, p):
        return lora_linear(x, w, a, b, scaling, bias=bias, dropout_p=p, seed=99, backend="torch")

    for scaling, p in ((0.5, 0.1), (0.75, 0.2), (1.25, 0.3)):
        y = f(x, scaling, p)
        ref, _ = reference_with_grads(x, w, a, b, bias, scaling, torch.ones_like(y), p=p, seed=99)
        assert_close(y, ref, torch.float32, f"scaling={scaling} p={p}")
    with pytest.raises(Exception, match="scaling: expected a finite number, got inf"):
        f(x, float("inf"), 0.1)


def _f64_grads(x, w, a, b, bias, scaling, post, dy):
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, bias)]
    x64, a64, b64, bias64 = leaves
    y = post(x64 @ w.double().t() + scaling * (x64 @ a64.t()) @ b64.t() + bias64)
    y.backward(dy.double())
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["relu_ in the graph", "+= after the graph"])
def test_in_place_ops_on_the_output_in_and_after_a_compiled_graph(backend, where):
    """The op's output is not a view made inside its autograd Function: relu_() inside the compiled function,
    or += on what the graph returns, trains exactly."""
    x, w, a, b, bias = _inputs(torch.float32)
    x, a, b, bias = (t.detach().requires_grad_() for t in (x, a, b, bias))
    dy = _rnd(3, 9, 35, g=torch.Generator().manual_seed(7))
    t = _rnd(3, 9, 35, g=torch.Generator().manual_seed(8))
    inside = where.startswith("relu_")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, a, b, bias):
        y = lora_linear(x, w, a, b, 0.75, bias=bias, backend=backend)
        if inside:
            y.relu_()
        return y

    y = f(x, a, b, bias)
    if not inside:
        y += t
    y.backward(dy)
    ref_y, grads = _f64_grads(x, w, a, b, bias, 0.75, torch.relu if inside else (lambda y: y + t.double()), dy)
    assert_close(y, ref_y, torch.float32, "y")
    for what, got, exp in zip(("dx", "dA", "dB", "dbias"), (x.grad, a.grad, b.grad, bias.grad), grads):
        assert_close(got, exp, torch.float32, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_op_call_output_modifiable_and_twice_differentiable(backend):
    """lora_linear_traced called eagerly (what a graph calls): relu_() after it trains, and double backward
    is exact."""
    x, w, a, b, bias = _inputs(torch.float32)
    x, a, b, bias = (t.detach().requires_grad_() for t in (x, a, b, bias))
    dy = _rnd(3, 9, 35, g=torch.Generator().manual_seed(9))
    y = lora_linear_custom_op.lora_linear_traced(x, w, a, b, 0.75, bias=bias, backend=backend)
    y.relu_()
    y.backward(dy)
    ref_y, grads = _f64_grads(x, w, a, b, bias, 0.75, torch.relu, dy)
    assert_close(y, ref_y, torch.float32, "y")
    for what, got, exp in zip(("dx", "dA", "dB", "dbias"), (x.grad, a.grad, b.grad, bias.grad), grads):
        assert_close(got, exp, torch.float32, what)
    # second derivative: d/d(x, A, B) of <dL/dx, c> with L = sum((y * dy)^2)
    c = _rnd(3, 9, 21, g=torch.Generator().manual_seed(10))
    for t in (x, a, b):
        t.grad = None
    y = lora_linear_custom_op.lora_linear_traced(x, w, a, b, 0.75, bias=bias, backend=backend)
    (gx,) = torch.autograd.grad((y * dy).square().sum(), x, create_graph=True)
    (gx * c).sum().backward()
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w.double().t() + 0.75 * (x64 @ a64.t()) @ b64.t() + bias.detach().double()
    (gx64,) = torch.autograd.grad((y64 * dy.double()).square().sum(), x64, create_graph=True)
    (gx64 * c.double()).sum().backward()
    assert_close(gx, gx64, torch.float32, "first derivative dx")
    for what, got, exp in zip(("x", "A", "B"), (x.grad, a.grad, b.grad), (x64.grad, a64.grad, b64.grad)):
        assert got is not None, what
        assert_close(got, exp, torch.float32, f"second derivative w.r.t. {what}")


# ------------------------------------------------------------------- adapter, IA3, multi-LoRA: compiled == eager


class _InPlaceAfter(nn.Module):
    """The module under test, then an in-place edit of its output inside the compiled graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, *extra):
        return self.inner(x, *extra).mul_(1.5)


def _compiled_matches_eager(make, x, *extra, function: str):
    """make() builds the same module each call. Its fullgraph compile (mul_() inside the graph, += on what the
    graph returns) gives the eager outputs and gradients; the eager call runs the autograd `function`."""
    torch._dynamo.reset()  # the wrapper's code is shared by every test: a fresh recompile budget for each
    eager, model = make(), make()
    assert function in eager(x, *extra).grad_fn.name()  # eager calls stay on the autograd.Function
    dy = _rnd(*x.shape[:-1], eager(x, *extra).shape[-1], g=torch.Generator().manual_seed(3))
    results = []
    for run, m in ((_InPlaceAfter(eager), eager),
                   (torch.compile(_InPlaceAfter(model), fullgraph=True, backend="aot_eager"), model)):
        xi = x.detach().clone().requires_grad_()
        y = run(xi, *extra)
        y += 0.25
        y.backward(dy)
        results.append([("y", y), ("dx", xi.grad)] + [(f"grad of {n}", p.grad) for n, p in m.named_parameters()
                                                     if p.requires_grad])
    for (what, exp), (_, got) in zip(*results):
        assert got is not None, what
        assert_close(got, exp, torch.float32, f"compiled {what}")
    return model


def _x_odd(d=21, seed=1):
    return _rnd(5, 3, d, g=torch.Generator().manual_seed(seed)).transpose(0, 1)  # [3, 5, d], not contiguous


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["series", "layer_norm"])
def test_compiled_bottleneck_adapter_matches_eager(backend, layer_norm):
    def make():
        torch.manual_seed(0)
        m = BottleneckAdapter(21, 6, activation="gelu_tanh", scaling=0.7, layer_norm=layer_norm, backend=backend)
        nn.init.normal_(m.up_weight, std=0.3)  # non-zero: the adapter's branch counts
        return m.to(DEVICE)

    _compiled_matches_eager(make, _x_odd(), function="BottleneckAdapterFunction")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["output", "input"])
def test_compiled_ia3_matches_eager(backend, mode):
    def make():
        torch.manual_seed(0)
        m = IA3Linear(nn.Linear(21, 13), scale=mode, backend=backend)
        with torch.no_grad():
            m.ia3_scale.uniform_(0.5, 1.5)
        return m.to(DEVICE)

    _compiled_matches_eager(make, _x_odd(), function="IA3LinearFunction")


def _multi_lora_layer(backend):
    torch.manual_seed(0)
    m = MultiLoRALinear(nn.Linear(21, 13), num_adapters=3, r=4, backend=backend).to(DEVICE)
    nn.init.normal_(m.lora_B, std=0.3)
    m.unload_adapter(1)  # an empty slot: its ids are refused
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_multi_lora_matches_eager_and_checks_ids(backend):
    """Per-sequence ids (expanded in the graph) and per-token ids; the id check runs inside an op, so a bad
    id still raises, naming the value and its position, when the graph runs."""
    model = _compiled_matches_eager(lambda: _multi_lora_layer(backend), _x_odd(), torch.tensor([2, -1, 0]),
                                    function="MultiLoRALinearFunction")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, tok = _x_odd(), torch.tensor([[0, 2, -1, 0, 2]] * 3, dtype=torch.int8)
    assert_close(compiled(x, tok), model(x, tok), torch.float32, "per-token ids")
    with pytest.raises(ValueError, match=r"adapter_ids: id 1 at position \(1, 3\) refers to an empty adapter slot"):
        compiled(x, torch.tensor([[0, 2, -1, 0, 2], [0, 0, 0, 1, 2], [2, 2, 2, 2, 2]], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"expected ids in \[-1, 3\).*got 7 at position 2"):
        compiled(x, torch.tensor([0, 2, 7]))


def test_compiled_functional_multi_lora_matches_eager():
    """The functional op with host lists (ranks, offsets, scalings) and a CPU scalings tensor, under
    no_grad and with gradients; a non-finite CPU scalings tensor is refused by the op when the graph runs."""
    g = torch.Generator().manual_seed(4)
    w, a, b = _rnd(13, 21, g=g, scale=0.2), _rnd(9, 21, g=g, scale=0.2), _rnd(13, 9, g=g, scale=0.3)
    a.requires_grad_()
    ids = torch.tensor([1, 0, 1])

    def f(x, scalings):
        return multi_lora_linear(x, w, a, b, ids, scalings, ranks=[4, 5], offsets=[5, 0], backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = _x_odd()
    for scalings in ([0.5, 2.0], torch.tensor([0.5, 2.0])):
        y = compiled(x, scalings)
        (ga,) = torch.autograd.grad(y.square().sum(), a)
        y_ref = f(x, scalings)
        (ga_ref,) = torch.autograd.grad(y_ref.square().sum(), a)
        assert_close(y, y_ref, torch.float32, "y")
        assert_close(ga, ga_ref, torch.float32, "dA")
    with pytest.raises(ValueError, match="scalings: expected finite numbers"):
        compiled(x, torch.tensor([0.5, float("nan")]))


# ----------------------------------------------------------------------------------- gradient-free GaLore linear


def _galore_model(projector):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(21, 16), nn.GELU(), nn.Linear(16, 12, bias=False)).to(DEVICE)
    return galore.enable(model, ["0", "2"], rank=4, update_proj_gap=2, projector=projector, backend="torch")


def _galore_step(model, opt, t):
    g = torch.Generator().manual_seed(100 + t)
    x = _rnd(5, 3, 21, g=g).transpose(0, 1)
    torch.manual_seed(1000 + t)  # the randomized refresh draws its sketch seed from torch's generator
    y = model(x)
    y.mul_(1.5)  # in place on the op's output, inside the graph for a compiled model
    y += 0.25
    y.square().sum().backward()
    opt.step()
    opt.zero_grad()
    return y.detach()


@pytest.mark.skipif(not galore_linear_custom_op.SUPPORTED, reason=str(galore_linear_custom_op.UNSUPPORTED_REASON))
@pytest.mark.parametrize("projector", ["randomized", "svd"])
def test_compiled_galore_training_matches_eager(projector):
    """fastpeft.galore layers compiled with fullgraph=True: the backward's projected-gradient accumulation (and
    the projector refresh) runs inside an effectful op, so three GaLoreAdamW steps (two refreshes) give the
    eager weights, and no weight gradient ever exists."""
    torch._dynamo.reset()
    eager, model = _galore_model(projector), _galore_model(projector)
    assert isinstance(getattr(model[0].galore, "op_ref", None), galore_linear_custom_op.GaLoreStateRef), \
        "fastpeft/galore.py: each GaLoreLinearState needs its GaLoreStateRef (op_ref), see galore_linear_custom_op.py"
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opts = [GaLoreAdamW(m.parameters(), lr=0.01, backend="torch") for m in (eager, model)]
    for t in range(3):
        y_ref, y = _galore_step(eager, opts[0], t), _galore_step(compiled, opts[1], t)
        assert_close(y, y_ref, torch.float32, f"step {t} output")
        for (n, p), p_ref in zip(model.named_parameters(), eager.parameters()):
            assert p.grad is None, n
            assert_close(p, p_ref, torch.float32, f"step {t} {n}")


@pytest.mark.skipif(not galore_linear_custom_op.SUPPORTED, reason=str(galore_linear_custom_op.UNSUPPORTED_REASON))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_compiled_galore_op_matches_eager(autocast):
    """The ops through galore_linear_traced: y, dx, dbias and the accumulated projection R equal the eager
    Function's, under CPU autocast too (the graph passes autocast's dtype to the op)."""
    torch._dynamo.reset()
    states = []
    for _ in range(2):
        layer = galore.enable(nn.Sequential(nn.Linear(21, 16)), ["0"], rank=4, backend="torch")[0].to(DEVICE)
        st = layer.galore
        if not isinstance(getattr(st, "op_ref", None), galore_linear_custom_op.GaLoreStateRef):
            st.op_ref = galore_linear_custom_op.GaLoreStateRef(st)  # until fastpeft/galore.py makes it
        states.append((layer, st))
    (l0, st0), (l1, st1) = states
    with torch.no_grad():
        l1.weight.copy_(l0.weight)
        l1.bias.copy_(l0.bias)
    traced = torch.compile(galore_linear_custom_op.galore_linear_traced, fullgraph=True, backend="aot_eager")
    x = _x_odd()
    dy = _rnd(3, 5, 16, g=torch.Generator().manual_seed(9))
    out = []
    for fn, (layer, st) in ((galore_linear, states[0]), (traced, states[1])):
        xi = x.detach().clone().requires_grad_()
        torch.manual_seed(5)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            y = fn(xi, layer.weight, layer.bias, st)
        y.backward(dy.to(y.dtype))
        out.append((y, xi.grad, layer.bias.grad, st.R, layer.weight.grad))
    (y0, dx0, db0, r0, w0), (y1, dx1, db1, r1, w1) = out
    assert w0 is None and w1 is None
    dt = torch.bfloat16 if autocast else torch.float32
    assert y1.dtype == y0.dtype == dt and dx1.dtype == db1.dtype == torch.float32
    for what, got, exp in (("y", y1, y0), ("dx", dx1, dx0), ("dbias", db1, db0), ("R", r1, r0)):
        assert_close(got, exp, dt if what == "y" else torch.float32, f"compiled galore {what}")
