"""fastpeft.multi_lora_linear / MultiLoRALinear / inject_multi_lora against a loop of single-adapter float64
references (tests/reference_lora.py, one call per adapter on that adapter's tokens), both backends.

On CPU the Triton kernels run under the interpreter (tests/conftest.py); bf16 Triton runs on CUDA only.
Pools mix ranks (3, 8, 20, ...), hold an empty slot (rank 0), and are not packed in id order, so the rank
masks and the per-adapter offsets are exercised; M > 64 takes the sorted (SGMV) forward, M <= 64 the
unsorted (BGMV) one, and every backward groups tokens into per-adapter segment tiles.
"""
import math

import pytest
import torch

import fastpeft  # noqa: F401  (maps kernels/ to fastpeft.kernels)
from fastpeft.inject_multi import (
    inject_multi_lora, load_multi_adapter, multi_lora_batch, unload_multi_adapter,
)
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.multi_lora import MultiLoRALinear
from fastpeft.ops.multi_lora import multi_lora_linear
from reference_lora import reference_with_grads
from tolerances import assert_close

from conftest import DEVICE

BACKENDS = ["torch", "triton"]


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter computes bf16 dots wrongly; bf16 Triton is tested on CUDA")


def _pool(k, n, ranks, offsets, dtype, seed, adapter_dtype=None):
    g = torch.Generator().manual_seed(seed)
    r_total = max((o + r for o, r in zip(offsets, ranks)), default=1)
    adt = adapter_dtype or dtype
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(DEVICE, dtype)
    a = (torch.randn(r_total, k, generator=g) / math.sqrt(k)).to(DEVICE, adt)
    b = (torch.randn(n, r_total, generator=g) / 2).to(DEVICE, adt)  # B non-zero: the low-rank term is tested
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    return w, a, b, bias


def loop_reference(x, w, a, b, bias, ids, scalings, ranks, offsets, dy):
    """Float64 y, dx, d(lora_a), d(lora_b): one single-adapter reference per adapter on its own tokens."""
    x2, dy2, ids = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), ids.reshape(-1).cpu()
    y = (x2.double() @ w.double().t() + (bias.double() if bias is not None else 0)).cpu()
    dx = (dy2.double() @ w.double()).cpu()
    da = torch.zeros(a.shape, dtype=torch.float64)
    db = torch.zeros(b.shape, dtype=torch.float64)
    for i, (r, o, s) in enumerate(zip(ranks, offsets, scalings)):
        rows = (ids == i).nonzero().flatten()
        if r == 0 or rows.numel() == 0:
            continue
        y_i, (dx_i, _, da_i, db_i, _) = reference_with_grads(x2[rows.to(x.device)].cpu(), w.cpu(), a[o:o + r].cpu(),
                                                             b[:, o:o + r].cpu(), bias.cpu() if bias is not None else None,
                                                             s, dy2[rows.to(x.device)].cpu())
        y[rows], dx[rows] = y_i, dx_i
        da[o:o + r], db[:, o:o + r] = da_i, db_i
    return y.reshape(*x.shape[:-1], -1), dx.reshape(x.shape), da, db


def _run(backend, x, w, a, b, bias, ids, scalings, ranks, offsets, dy, requires=(True, True, True), **kw):
    xl, al, bl = (t.detach().clone().requires_grad_(req) for t, req in zip((x, a, b), requires))
    y = multi_lora_linear(xl, w, al, bl, ids, scalings, ranks, offsets, bias=bias, backend=backend, **kw)
    y.backward(dy)
    return y, xl.grad, al.grad, bl.grad


# name: (M, in, out, ranks, offsets (unpacked, not in id order), ids or None for random with -1)
CASES = {
    "mixed-unsorted": (37, 45, 53, [3, 8, 0, 20, 5], [33, 0, 8, 8, 28], None),
    "sorted-path": (83, 40, 24, [16, 4, 9], [0, 16, 20], None),
    "all-distinct": (6, 33, 17, [4, 16, 7, 12, 1, 5], [0, 4, 20, 27, 39, 40], [3, 0, 5, 1, 4, 2]),
    "M=1": (1, 24, 40, [6, 2], [2, 0], [1]),
    "all-base": (9, 20, 18, [4, 4], [0, 4], [-1] * 9),
}


def _case_inputs(name, dtype, adapter_dtype=None):
    M, k, n, ranks, offsets, ids = CASES[name]
    w, a, b, bias = _pool(k, n, ranks, offsets, dtype, seed=len(name), adapter_dtype=adapter_dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, k, generator=g).to(DEVICE, dtype)
    dy = torch.randn(M, n, generator=g).to(DEVICE, dtype)
    if ids is None:
        ids = torch.randint(-1, len(ranks), (M,), generator=g)  # repeated, unsorted, -1, a rank-0 adapter
    ids = torch.as_tensor(ids).to(DEVICE)
    scalings = [0.5 + 0.25 * i * (-1) ** i for i in range(len(ranks))]
    return x, w, a, b, bias, ids, scalings, ranks, offsets, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_loop_of_single_adapter_references(backend, dtype, case):
    _skip_unsupported(backend, dtype)
    if backend == "triton" and dtype == torch.float16 and DEVICE == "cpu" and case in ("all-base", "M=1"):
        pytest.skip("covered in fp32 under the interpreter (time budget)")
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs(case, dtype)
    y, dx, da, db = _run(backend, x, w, a, b, bias, ids, sc, ranks, offs, dy)
    y_ref, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy)
    assert y.dtype == dtype and da.dtype == a.dtype and db.dtype == b.dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    if da_ref.abs().sum() == 0:  # all-base: the pool gradient is exactly zero
        assert torch.equal(da.cpu(), torch.zeros_like(da).cpu()) and torch.equal(db.cpu(), torch.zeros_like(db).cpu())
    else:
        assert_close(da, da_ref, dtype, "dA")
        assert_close(db, db_ref, dtype, "dB")


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_adapter_gradient_comes_only_from_its_own_tokens(backend):
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("mixed-unsorted", torch.float32)
    for target in (3,) if backend == "triton" else (0, 3):  # adapter 3: rank 20, two rank chunks
        mine = (ids == target)[:, None]
        dy_t = torch.where(mine, dy, torch.zeros_like(dy))  # upstream gradient only on the target's tokens
        _, dx, da, db = _run(backend, x, w, a, b, bias, ids, sc, ranks, offs, dy_t)
        o, r = offs[target], ranks[target]
        own = torch.zeros(a.shape[0], dtype=torch.bool)
        own[o:o + r] = True
        assert da[own.to(DEVICE)].abs().sum() > 0 and db[:, own.to(DEVICE)].abs().sum() > 0
        assert torch.equal(da[~own.to(DEVICE)], torch.zeros_like(da[~own.to(DEVICE)])), "dA leaked to other adapters"
        assert torch.equal(db[:, ~own.to(DEVICE)], torch.zeros_like(db[:, ~own.to(DEVICE)])), "dB leaked to other adapters"
        _, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy_t)
        assert_close(da, da_ref, torch.float32, "dA")
        assert_close(db, db_ref, torch.float32, "dB")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_paths_and_per_sequence_ids(backend, monkeypatch):
    """no_grad forward: unsorted (M <= 64), sorted (M > 64), and per-sequence ids over 3-D x (runs of 64+
    tokens: the sort is skipped); each against the loop reference."""
    w, a, b, bias = _pool(36, 28, [5, 12, 3], [0, 5, 17], torch.float32, seed=3)
    sc, ranks, offs = [2.0, 0.5, -1.0], [5, 12, 3], [0, 5, 17]
    g = torch.Generator().manual_seed(1)
    for shape, ids in (((50, 36), torch.randint(-1, 3, (50,), generator=g)),
                       ((97, 36), torch.randint(-1, 3, (97,), generator=g)),
                       ((3, 65, 36), torch.tensor([2, -1, 0])),
                       ((2, 5, 36), torch.tensor([[0, 1, 2, -1, 0], [1, 1, 2, 2, 0]]))):
        x = torch.randn(*shape, generator=g).to(DEVICE)
        ids = ids.to(DEVICE)
        with torch.no_grad():
            y = multi_lora_linear(x, w, a, b, ids, sc, ranks, offs, bias=bias, backend=backend)
        tok = ids[:, None].expand(shape[0], shape[1]).reshape(-1) if ids.numel() == shape[0] and len(shape) == 3 else ids
        y_ref = loop_reference(x, w, a, b, bias, tok, sc, ranks, offs, torch.zeros(*shape[:-1], 28, device=DEVICE))[0]
        assert y.shape == (*shape[:-1], 28)
        assert_close(y, y_ref, torch.float32, f"y {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_grad_output(backend):
    ranks, offs, sc = [4, 7, 2], [9, 0, 7], [1.0, 1.5, 0.25]
    w, a, b, bias = _pool(30, 22, ranks, offs, torch.float32, seed=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(41, 60, generator=g).to(DEVICE)[:, ::2]  # column-strided
    a = a.t().contiguous().t()  # column-major pool A
    b = b.t().contiguous().t()
    dy = torch.randn(22, 41, generator=g).to(DEVICE).t()  # column-major upstream gradient
    ids = torch.randint(-1, 3, (41,), generator=g).to(DEVICE)
    y, dx, da, db = _run(backend, x, w, a, b, bias, ids, sc, ranks, offs, dy)
    y_ref, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy)
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
        assert_close(got, ref, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_pool_over_half_precision_base_and_only_needed_gradients(backend):
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("sorted-path", torch.float16, adapter_dtype=torch.float32)
    y, dx, da, db = _run(backend, x, w, a, b, bias, ids, sc, ranks, offs, dy, requires=(False, True, False))
    y_ref, _, da_ref, _ = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy)
    assert dx is None and db is None and da.dtype == torch.float32
    assert_close(y, y_ref, torch.float16, "y")
    assert_close(da, da_ref, torch.float16, "dA")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_is_written(backend, monkeypatch):
    """Outputs, partials and metadata from torch.empty are NaN-filled; nothing of it may survive."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("mixed-unsorted", torch.float32)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    y, dx, da, db = _run(backend, x, w, a, b, bias, ids, sc, ranks, offs, dy)
    monkeypatch.undo()
    y_ref, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy)
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
        assert_close(got, ref, torch.float32, name)


def test_backends_agree_and_are_deterministic():
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("sorted-path", torch.float32)
    t1 = _run("triton", x, w, a, b, bias, ids, sc, ranks, offs, dy)
    t2 = _run("triton", x, w, a, b, bias, ids, sc, ranks, offs, dy)
    ref = _run("torch", x, w, a, b, bias, ids, sc, ranks, offs, dy)
    for got, again, other in zip(t1, t2, ref):
        assert torch.equal(got, again), "the Triton backend is not bit-for-bit repeatable"
        torch.testing.assert_close(got, other, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- bad input


def _bad_call(**over):
    w, a, b, bias = _pool(8, 6, [2, 3], [0, 2], torch.float32, seed=0)
    kw = dict(x=torch.randn(5, 8).to(DEVICE), weight=w, lora_a=a, lora_b=b, adapter_ids=torch.tensor([0, 1, -1, 1, 0]),
              scalings=[1.0, 2.0], ranks=[2, 3], offsets=[0, 2], bias=bias, backend="torch")
    kw.update(over)
    return multi_lora_linear(**kw)


@pytest.mark.parametrize("over, exc, match", [
    (dict(adapter_ids=torch.tensor([0, 1, 2, 1, 0])), ValueError, r"adapter_ids: expected ids in \[-1, 2\).*got 2 at position 2"),
    (dict(adapter_ids=torch.tensor([0, 1, -2, 1, 0])), ValueError, r"got -2 at position 2"),
    (dict(adapter_ids=torch.tensor([0, 1, 1])), ValueError, r"adapter_ids: expected shape \[5\].*got \(3,\)"),
    (dict(adapter_ids=torch.tensor([0.0, 1, 1, 0, 0])), TypeError, r"adapter_ids: expected an integer dtype.*float32"),
    (dict(adapter_ids=torch.tensor([True, False, True, True, False])), TypeError, r"adapter_ids: expected an integer dtype.*bool"),
    (dict(adapter_ids="0"), TypeError, r"adapter_ids: expected a tensor of ints, got str"),
    (dict(ranks=[2, 4]), ValueError, r"offsets\[1\]: adapter 1 \(rank 4\) at offset 2 ends at 6, past the 5 rank rows"),
    (dict(offsets=[0, 1]), ValueError, r"offsets: adapters 0 \(rows 0..2\) and 1 \(rows 1..4\) overlap"),
    (dict(ranks=[2]), ValueError, r"ranks: expected 2 entries"),
    (dict(ranks=[2, -1]), ValueError, r"ranks\[1\]: expected an int >= 0, got -1"),
    (dict(scalings=[1.0, float("nan")]), ValueError, r"scalings\[1\]: expected a finite number"),
    (dict(max_rank=2), ValueError, r"max_rank: expected an int >= 3"),
    (dict(lora_b=torch.randn(6, 4)), ValueError, r"lora_b: expected the pool shape \[6, 5\]"),
    (dict(x=torch.randn(5, 7)), ValueError, r"x: expected last dimension 8"),
    (dict(x=torch.randn(5, 8, dtype=torch.float64)), TypeError, r"x: expected dtype in"),
    (dict(backend="gpu"), ValueError, r"backend: expected one of"),
])
def test_bad_input_raises_clearly(over, exc, match):
    if "x" in over:
        over["x"] = over["x"].to(DEVICE)
    with pytest.raises(exc, match=match):
        _bad_call(**over)


def test_triton_rank_limit_is_explicit():
    w, a, b, _ = _pool(8, 6, [130], [0], torch.float32, seed=0)
    with pytest.raises(fastpeft.BackendUnavailableError, match="max_rank=130"):
        multi_lora_linear(torch.randn(3, 8).to(DEVICE), w, a, b, [0, 0, -1], [1.0], backend="triton")


# ----------------------------------------------------------------------------------------------- module


def _lora_layers(base, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, r in enumerate(ranks):
        m = LoRALinear(base, r=r, alpha=2 * r + i)
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
        layers.append(m)
    return layers


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_from_lora_layers_matches_each_layer(backend):
    torch.manual_seed(0)
    base = torch.nn.Linear(26, 19).to(DEVICE)
    layers = _lora_layers(base, [4, 9, 2], seed=1)
    pool = MultiLoRALinear.from_lora_layers(layers, capacity=5, backend=backend)
    assert pool.ranks == [4, 9, 2, 0, 0] and pool.r == 9
    x = torch.randn(2, 13, 26, device=DEVICE)
    ids = torch.tensor([[0, 1, 2, -1, 1, 0, 2, 2, 1, 0, -1, 0, 1], [2] * 13], device=DEVICE)
    y = pool(x, ids)
    for i, layer in enumerate(layers):
        sel = ids == i
        assert_close(y[sel], layer(x)[sel].detach().double(), torch.float32, f"adapter {i}")
    assert_close(y[ids == -1], base(x)[ids == -1].detach().double(), torch.float32, "base")
    with pytest.raises(ValueError, match="refers to an empty adapter slot"):
        pool(x, torch.full((2,), 3, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_trains_several_adapters_and_reloads_at_run_time(backend):
    torch.manual_seed(0)
    base = torch.nn.Linear(20, 12).to(DEVICE)
    pool = MultiLoRALinear(base, num_adapters=3, r=6, alpha=12, backend=backend)
    assert pool.ranks == [6, 6, 6] and not base.weight.requires_grad
    x = torch.randn(30, 20, device=DEVICE)
    y0 = pool(x, torch.arange(30, device=DEVICE) % 3)
    assert_close(y0, base(x).detach().double(), torch.float32, "B = 0 at init: equals the base layer")
    pool(x, torch.arange(30, device=DEVICE) % 3).square().sum().backward()
    assert pool.lora_B.grad.abs().sum() > 0 and pool.lora_A.grad is not None
    # run-time load of a lower-rank adapter into slot 1, and unload of slot 2: the table changes in place
    rank_buf = pool.adapter_rank
    a1, b1 = torch.randn(3, 20, device=DEVICE), torch.randn(12, 3, device=DEVICE)
    pool.load_adapter(1, a1, b1, alpha=6.0, name="new")
    pool.unload_adapter(2)
    assert pool.adapter_rank is rank_buf and pool.ranks == [6, 3, 0] and pool.free_slot() == 2
    ids = torch.tensor([1] * 5 + [-1] * 2, device=DEVICE)
    y = pool(x[:7], ids)
    expect = base(x[:7]) + (ids == 1)[:, None] * (2.0 * (x[:7] @ a1.t()) @ b1.t())
    assert_close(y, expect.detach().double(), torch.float32, "reloaded slot")
    with pytest.raises(ValueError, match="lora_A: expected shape \\[r_i, 20\\] with 1 <= r_i <= 6"):
        pool.load_adapter(0, torch.randn(7, 20), torch.randn(12, 7))


@pytest.mark.skipif(DEVICE != "cuda", reason="compile caches exist only on CUDA (the interpreter compiles nothing)")
def test_loading_adapters_recompiles_nothing():
    from fastpeft.kernels import multi_lora as k

    base = torch.nn.Linear(64, 64).to(DEVICE, torch.bfloat16)
    pool = MultiLoRALinear(base, num_adapters=4, r=16, init_adapters=False)
    pool.load_adapter(0, torch.randn(16, 64), torch.randn(64, 16))
    x = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    pool(x, torch.zeros(8, dtype=torch.int64, device=DEVICE))

    def cached():
        return sum(len(c[0]) for c in k._multi_lora_gemm_kernel.device_caches.values())

    before = cached()
    pool.load_adapter(1, torch.randn(5, 64), torch.randn(64, 5))
    pool(x, torch.ones(8, dtype=torch.int64, device=DEVICE))
    assert cached() == before


# ----------------------------------------------------------------------------------------------- inject / PEFT


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inject_matches_peft_mixed_batch(backend, tmp_path):
    peft = pytest.importorskip("peft")
    import copy

    base = _tiny_llama()
    ours = copy.deepcopy(base).to(DEVICE)
    targets = ["q_proj", "v_proj"]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.eval()
    ids = torch.randint(0, 40, (3, 7))
    with torch.no_grad():
        want = pm(ids, adapter_names=["b", "__base__", "a"]).logits
    sd = {nm: peft.get_peft_model_state_dict(pm, adapter_name=nm) for nm in ("a", "b")}
    pm.save_pretrained(str(tmp_path), selected_adapters=["b"])
    inject_multi_lora(ours, targets, adapters={"a": sd["a"], "b": str(tmp_path / "b")}, alphas={"a": 8},
                      capacity=3, backend=backend)
    with torch.no_grad():
        got = ours(ids.to(DEVICE), adapter_names=["b", "__base__", "a"]).logits
        assert_close(got, want.double(), torch.float32, "logits")
        with multi_lora_batch(ours, ["a", "a", "b"]):
            again = ours(ids.to(DEVICE)).logits
        assert_close(again[:2], pm(ids[:2], adapter_names=["a", "a"]).logits.double(), torch.float32, "context")
        # run time: unload b, load it again under another name into the freed slot
        unload_multi_adapter(ours, "b")
        with pytest.raises(ValueError, match="adapter_names\\[0\\]: expected one of \\['a'\\]"):
            ours(ids.to(DEVICE), adapter_names=["b", "a", "a"])
        assert load_multi_adapter(ours, "b2", sd["b"], alpha=4) in (1, 2)
        got2 = ours(ids.to(DEVICE), adapter_names=["b2", "__base__", "a"]).logits
    assert_close(got2, want.double(), torch.float32, "logits after reload")
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_inject_rejects_unmatched_adapter_keys():
    base = _tiny_llama()
    with pytest.raises(ValueError, match="matches no targeted module"):
        inject_multi_lora(base, ["q_proj"], adapters={"x": {"model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 32),
                                                           "model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(40, 2)}})


# ----------------------------------------------------------------------------------------------- layouts (issue 11)
# Every tensor argument at every storage layout: the kernels take every stride (1-D vectors included) and
# the results match the float64 loop reference, forward and every gradient, in both backends.


def _as_layout(t, kind, g):
    """A tensor with t's values (rows of t for "expanded": its first row / element repeated) stored as `kind`."""
    if kind == "contig":
        return t.contiguous()
    if kind == "sliced":  # every other element of a larger tensor, in every dimension
        big = torch.randn(*(2 * s for s in t.shape), generator=g).to(t.device, t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    if kind == "offset":  # a view into a larger flat buffer, not at its start
        buf = torch.randn(t.numel() + 5, generator=g).to(t.device, t.dtype)
        view = buf[5:].view(t.shape)
        view.copy_(t)
        return view
    if kind == "transposed":  # column-major storage of a 2-D tensor, reversed dims for more
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
    if kind == "expanded":  # stride 0 along the first dimension
        return t[:1].expand(t.shape)
    raise AssertionError(kind)


# name: (lead shape of x, per-sequence ids?, layouts of x, weight, lora_a, lora_b, bias, scalings, ids, dy)
LAYOUTS = {
    "sliced-vectors": ((9,), False, "sliced", "transposed", "sliced", "transposed", "sliced", "sliced", "sliced", "expanded"),
    "expanded": ((1, 11), True, "expanded", "expanded", "offset", "expanded", "expanded", "expanded", "contig", "transposed"),
    "transposed-3d": ((3, 5), False, "transposed", "sliced", "transposed", "sliced", "offset", "offset", "transposed", "sliced"),
    "sorted-path-offsets": ((70,), False, "offset", "offset", "expanded", "offset", "contig", "sliced", "offset", "offset"),
}


def _layout_case(name, dtype, seed=11):
    lead, per_seq, lx, lw, la, lb, lbias, lsc, lids, ldy = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    ranks, offs = [3, 0, 5, 2], [5, 0, 0, 8]
    k, n = 13, 10
    w, a, b, bias = _pool(k, n, ranks, offs, dtype, seed=seed)
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    dy = torch.randn(*lead, n, generator=g).to(DEVICE, dtype)
    sc = torch.tensor([0.75, -1.5, 2.0, 0.5])
    ids = torch.randint(-1, 4, lead[:1] if per_seq else lead, generator=g).to(DEVICE)
    out = [_as_layout(t, kind, g) for t, kind in ((x, lx), (w, lw), (a, la), (b, lb), (bias, lbias), (sc, lsc),
                                                   (ids, lids), (dy, ldy))]
    return out + [ranks, offs, per_seq]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_argument_at_every_layout(backend, name):
    x, w, a, b, bias, sc, ids, dy, ranks, offs, per_seq = _layout_case(name, torch.float32)
    # ranks and offsets as (host) tensors at odd layouts too
    host = {"sliced-vectors": "sliced", "expanded": "offset", "transposed-3d": "contig"}.get(name)
    rk, of = (_as_layout(torch.tensor(v), host, torch.Generator()) if host else v for v in (ranks, offs))
    y, dx, da, db = _run(backend, x, w, a, b, bias, ids, sc, rk, of, dy)
    tok = ids[:, None].expand(x.shape[:-1]) if per_seq else ids
    y_ref, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, tok, sc.tolist(), ranks, offs, dy)
    for what, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
        assert_close(got, ref, torch.float32, f"{name} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sequence_with_a_per_sequence_id(backend):
    """x [1, S, in] with ids [1]: the ordinary single-request serving call (the expanded ids have stride 0)."""
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("mixed-unsorted", torch.float32)
    x, dy = x[None, :29], dy[None, :29]
    for one in (1, 3):
        y, dx, da, db = _run(backend, x, w, a, b, bias, torch.tensor([one], device=DEVICE), sc, ranks, offs, dy)
        y_ref, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, torch.full((29,), one), sc, ranks, offs, dy)
        for what, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
            assert_close(got, ref, torch.float32, f"adapter {one}: {what}")


ID_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_of_every_integer_dtype(backend):
    x, w, a, b, bias, _, sc, ranks, offs, dy = _case_inputs("sorted-path", torch.float32)
    x, dy = x[:12], dy[:12]
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0, 2, 1])
    y_ref, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy)
    dtypes = ID_DTYPES if backend == "torch" else [torch.int8, torch.uint8, torch.int16, torch.uint64]
    for dt in dtypes:
        y, dx, da, db = _run(backend, x, w, a, b, bias, ids.to(dt).to(DEVICE), sc, ranks, offs, dy)
        for what, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
            assert_close(got, ref, torch.float32, f"{dt}: {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_ids_of_any_dtype_out_of_range_mean_base_only(backend):
    """check_ids=False: an id outside [0, n) of any dtype is base only (uint8 200, int16 300, int64 2**40, ...)."""
    x, w, a, b, bias, _, sc, ranks, offs, dy = _case_inputs("sorted-path", torch.float32)
    many = torch.randint(0, 6, (x.shape[0],), generator=torch.Generator().manual_seed(0)).tolist()  # M > 64: sorted
    for raw, dt in ((many, torch.uint8), ([0, 200, 1, 2, 255, 0, 3, 1], torch.uint8),
                    ([0, 300, 1, 2, -7, 0, 3, 1], torch.int16),
                    ([0, 2 ** 40, 1, 2, -2 ** 33, 0, 2 ** 32 + 1, 1], torch.int64)):
        ids = torch.tensor(raw, dtype=dt)
        x, dy = x[:len(raw)], dy[:len(raw)]
        tok = torch.where((ids.long() >= 0) & (ids.long() < 3), ids.long(), -1)
        y, dx, da, db = _run(backend, x, w, a, b, bias, ids.to(DEVICE), sc, ranks, offs, dy, check_ids=False)
        y_ref, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, tok, sc, ranks, offs, dy)
        for what, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dA", da, da_ref), ("dB", db, db_ref)):
            assert_close(got, ref, torch.float32, f"{dt}: {what}")


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([0, 1, 200, 1, 0], dtype=torch.uint8), r"expected ids in \[0, 2\).*got 200 at position 2"),
    (torch.tensor([0, 1, 1, 0, 255], dtype=torch.uint8), r"got 255 at position 4"),
    (torch.tensor([0, -5, 1, 0, 0], dtype=torch.int8), r"expected ids in \[-1, 2\).*got -5 at position 1"),
    (torch.tensor([0, 1, 1, 2 ** 40, 0]), r"got 1099511627776 at position 3"),
    (torch.tensor([0, 1, 1, 0, -2]).to(torch.uint64), r"got 18446744073709551614 at position 4"),
])
def test_bad_ids_of_any_dtype_name_the_value_and_position(ids, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(adapter_ids=ids)


def test_per_sequence_or_per_token_rule():
    """1-D ids of length x.shape[0] over x [batch, seq, in] are per sequence, of length batch·seq per token;
    when both lengths agree (seq = 1) both readings give the same ids."""
    from fastpeft.ops.multi_lora import prepare_ids

    x = torch.zeros(2, 3, 4)
    assert prepare_ids(torch.tensor([1, 0]), x, 2)[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert prepare_ids(torch.tensor([1, 0, 1, 1, 0, 0]), x, 2)[0].tolist() == [1, 0, 1, 1, 0, 0]
    assert prepare_ids(torch.tensor([[1, 0, 1], [1, 0, 0]]).t().contiguous().t(), x, 2)[0].tolist() == [1, 0, 1, 1, 0, 0]
    assert prepare_ids(torch.tensor([1, 0]), torch.zeros(2, 1, 4), 2)[0].tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"expected shape \[6\] or \[2, 3\] \(one per token\) or \[2\] \(one per sequence\)"):
        prepare_ids(torch.tensor([1, 0, 1]), x, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_may_be_modified_in_place(backend):
    """relu_() and += on the output in training (a view created inside the Function would refuse both)."""
    x, w, a, b, bias, _, sc, ranks, offs, dy = _case_inputs("mixed-unsorted", torch.float32)
    x, dy = x[:14].reshape(2, 7, -1), dy[:14].reshape(2, 7, -1)
    ids = torch.tensor([3, 0], device=DEVICE)
    tok = ids[:, None].expand(2, 7)
    y_ref, *_ = loop_reference(x, w, a, b, bias, tok, sc, ranks, offs, dy)
    for op in ("relu_", "+="):
        xl, al, bl = (t.detach().clone().requires_grad_() for t in (x, a, b))
        y = multi_lora_linear(xl, w, al, bl, ids, sc, ranks, offs, bias=bias, backend=backend)
        if op == "relu_":
            y.relu_()
            mask = (y_ref > 0).to(dy.dtype)
        else:
            y += 1.0
            mask = torch.ones_like(y_ref, dtype=dy.dtype)
        y.backward(dy)
        _, dx_ref, da_ref, db_ref = loop_reference(x, w, a, b, bias, tok, sc, ranks, offs, dy * mask.to(DEVICE))
        for what, got, ref in (("dx", xl.grad, dx_ref), ("dA", al.grad, da_ref), ("dB", bl.grad, db_ref)):
            assert_close(got, ref, torch.float32, f"{op}: {what}")
    pool = MultiLoRALinear(torch.nn.Linear(13, 9).to(DEVICE), num_adapters=2, r=3, backend=backend)
    with torch.no_grad():
        pool.lora_B.normal_()
    xm = torch.randn(2, 5, 13, device=DEVICE, requires_grad=True)
    out = pool(xm, torch.tensor([1, 0], device=DEVICE))
    out += 2.0
    torch.nn.ReLU(inplace=True)(out).sum().backward()
    assert xm.grad is not None and pool.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_not_implemented(backend):
    x, w, a, b, bias, ids, sc, ranks, offs, dy = _case_inputs("all-distinct", torch.float32)
    xl, al = x.clone().requires_grad_(), a.clone().requires_grad_()
    y = multi_lora_linear(xl, w, al, b, ids, sc, ranks, offs, bias=bias, backend=backend)
    gx, ga = torch.autograd.grad((y * dy).sum(), (xl, al), create_graph=True)  # the first derivative works
    _, dx_ref, da_ref, _ = loop_reference(x, w, a, b, bias, ids, sc, ranks, offs, dy)
    assert_close(gx, dx_ref, torch.float32, "dx under create_graph")
    assert_close(ga, da_ref, torch.float32, "dA under create_graph")
    with pytest.raises(NotImplementedError, match="multi_lora_linear.*double backward"):
        (gx.square().sum() + ga.sum()).backward()


# ----------------------------------------------------------------------------------------------- meta, copies


def test_meta_module_shapes_and_materialisation():
    real = MultiLoRALinear(torch.nn.Linear(13, 9), num_adapters=3, r=4)
    with torch.no_grad():
        real.lora_B.normal_()
    real.load_adapter(1, torch.randn(2, 13), torch.randn(9, 2), scaling=0.5)
    with torch.device("meta"):
        meta = MultiLoRALinear(torch.nn.Linear(13, 9), num_adapters=3, r=4)
    y = meta(torch.randn(2, 5, 13, device="meta"), torch.tensor([1, 0]))  # shape inference on the meta device
    assert y.shape == (2, 5, 9) and y.is_meta
    with pytest.raises(ValueError, match="meta"):
        meta(torch.randn(5, 13), torch.tensor([0, 1, 2, 0, 1]))
    meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    x, ids = torch.randn(6, 13), torch.tensor([0, 1, 2, -1, 1, 0])
    assert meta.ranks == [4, 2, 4] and torch.equal(meta(x, ids), real(x, ids))


def _roundtrips(module):
    import copy
    import io
    import pickle

    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(module), "pickle": pickle.loads(pickle.dumps(module)),
            "torch.save": torch.load(buf, weights_only=False)}


def _train_step(module, call):
    module.zero_grad(set_to_none=True)
    out = call(module)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_copies_pickles_and_saves(backend):
    torch.manual_seed(3)
    pool = MultiLoRALinear(torch.nn.Linear(13, 9).to(DEVICE), num_adapters=3, r=4, backend=backend)
    with torch.no_grad():
        pool.lora_B.normal_()
    pool.load_adapter(2, torch.randn(3, 13), torch.randn(9, 3), scaling=0.25, name="two")
    x, ids = torch.randn(7, 13, device=DEVICE), torch.tensor([2, 0, 1, -1, 2, 1, 0], device=DEVICE)
    want = _train_step(pool, lambda m: m(x, ids))
    copies = _roundtrips(pool)
    fresh = MultiLoRALinear(torch.nn.Linear(13, 9).to(DEVICE), num_adapters=3, r=4, backend=backend)
    fresh.load_state_dict(pool.state_dict())
    copies["state_dict"] = fresh
    for how, c in copies.items():
        assert c.ranks == [4, 4, 3], how
        got = _train_step(c, lambda m: m(x, ids))
        assert torch.equal(got[0], want[0]), how
        assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][k], want[1][k]) for k in want[1]), how


def _peft_dir(path, sd, cfg):
    from safetensors.torch import save_file
    import json

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


TARGETS4 = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _adapter_sd(model, targets, r, seed, bad=None):
    """A PEFT-keyed adapter state dict for `targets`; bad = target whose lora_B gets a wrong shape."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            rows = m.out_features + (1 if name.endswith(bad or "\0") else 0)
            sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g)
            sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(rows, r, generator=g)
    return sd


def _model_state(model):
    return ({n: t.clone() for n, t in model.state_dict().items()}, [type(m) for m in model.modules()],
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_same_state(model, state):
    tensors, types, flags = _model_state(model)
    assert types == state[1] and flags == state[2]
    assert tensors.keys() == state[0].keys() and all(torch.equal(tensors[k], state[0][k]) for k in tensors)


def test_load_multi_adapter_is_all_or_nothing(tmp_path):
    model = _tiny_llama()
    good = _adapter_sd(model, TARGETS4, 3, seed=1)
    inject_multi_lora(model, TARGETS4, adapters={"a": good}, capacity=2, r=4, backend="torch")
    bad_dir = _peft_dir(tmp_path / "bad", _adapter_sd(_tiny_llama(), TARGETS4, 2, seed=2, bad="o_proj"),
                        {"lora_alpha": 4, "r": 2})
    reg = model._fastpeft_multi_lora
    before = _model_state(model)
    for name in ("a", "b"):  # replacing an adapter, and loading a new one
        with pytest.raises(ValueError) as err:
            load_multi_adapter(model, name, str(bad_dir))
        msg = str(err.value)
        assert "o_proj" in msg and repr(name) in msg and "adapter_model.safetensors" in msg, msg
        _assert_same_state(model, before)
        assert reg.slots == {"a": 0}
    # the fixed file loads (and only then changes the model)
    ok_dir = _peft_dir(tmp_path / "ok", _adapter_sd(_tiny_llama(), TARGETS4, 2, seed=2), {"lora_alpha": 4, "r": 2})
    assert load_multi_adapter(model, "b", str(ok_dir)) == 1
    assert reg.slots == {"a": 0, "b": 1}


def test_inject_multi_lora_is_all_or_nothing_and_retry_works(tmp_path):
    model = _tiny_llama()
    before = _model_state(model)
    bad = _peft_dir(tmp_path / "bad", _adapter_sd(model, TARGETS4, 2, seed=2, bad="o_proj"), {"lora_alpha": 4})
    good = _adapter_sd(model, TARGETS4, 3, seed=1)
    with pytest.raises(ValueError) as err:
        inject_multi_lora(model, TARGETS4, adapters={"a": good, "b": str(bad)})
    msg = str(err.value)
    assert "o_proj" in msg and "'b'" in msg and "adapter_model.safetensors" in msg, msg
    _assert_same_state(model, before)
    assert not hasattr(model, "_fastpeft_multi_lora")
    with pytest.raises(ValueError, match="capacity"):
        inject_multi_lora(model, TARGETS4, adapters={"a": good}, capacity=0)
    _assert_same_state(model, before)
    inject_multi_lora(model, TARGETS4, adapters={"a": good}, capacity=2)  # the retry with fixed input works
    assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), MultiLoRALinear)


def test_inject_multi_lora_keeps_earlier_adapters_trainable():
    model = fastpeft.inject_lora(_tiny_llama(), ["up_proj"], r=2)
    inject_multi_lora(model, ["q_proj"], adapters={"a": _adapter_sd(model, ["q_proj"], 2, seed=1)})
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["model.layers.0.mlp.up_proj.lora_A", "model.layers.0.mlp.up_proj.lora_B",
                         "model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_model_single_request_and_copies(backend):
    """model(ids [1, S], adapter_names=["a"]) (a per-sequence id of one sequence) against the adapter merged
    into a twin model, and deepcopy / pickle / torch.save / state_dict copies that train the same."""
    model = _tiny_llama().to(DEVICE)
    sd = _adapter_sd(model, ["q_proj", "v_proj"], 3, seed=4)
    twin = _tiny_llama().to(DEVICE)
    inject_multi_lora(model, ["q_proj", "v_proj"], adapters={"a": sd, "b": _adapter_sd(model, ["q_proj"], 2, seed=5)},
                      alpha=6.0, backend=backend)
    tokens = torch.randint(0, 40, (1, 9), device=DEVICE)
    got = model(tokens, adapter_names=["a"]).logits
    # the same adapter as PEFT would apply it: W0 + s·B·A merged into the twin
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            lin = twin.get_submodule(f"model.layers.0.self_attn.{name}")
            a = sd[f"base_model.model.model.layers.0.self_attn.{name}.lora_A.weight"].double()
            b = sd[f"base_model.model.model.layers.0.self_attn.{name}.lora_B.weight"].double()
            lin.weight.copy_((lin.weight.double() + 2.0 * b @ a).float())
        want = twin(tokens).logits
    assert_close(got, want.double(), torch.float32, "single request")
    if backend != "torch":
        return  # copies hold no backend state: checked once, on the faster backend
    for p in model.parameters():
        p.grad = None
    model(tokens, adapter_names=["b"]).logits.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    copies = _roundtrips(model)
    fresh = inject_multi_lora(_tiny_llama().to(DEVICE), ["q_proj", "v_proj"], adapters={"a": sd, "b": sd},
                              backend=backend)
    fresh.load_state_dict(model.state_dict())
    copies["state_dict"] = fresh
    for how, c in copies.items():
        assert torch.equal(c(tokens, adapter_names=["a"]).logits, got.detach()), how
        c(tokens, adapter_names=["b"]).logits.square().sum().backward()
        cg = {n: p.grad for n, p in c.named_parameters() if p.grad is not None}
        assert cg.keys() == grads.keys() and all(torch.equal(cg[k], grads[k]) for k in grads), how
    # a copy is independent: unloading from the original leaves the copy's adapters alone
    unload_multi_adapter(model, "a")
    assert torch.equal(copies["deepcopy"](tokens, adapter_names=["a"]).logits, got.detach())
    # the call style survives the copies: generate passes adapter_names to every step
    import inspect

    assert "adapter_names" in inspect.signature(copies["pickle"].forward).parameters
    with torch.no_grad():
        out = copies["pickle"].generate(tokens, adapter_names=["a"], max_new_tokens=2, do_sample=False)
        assert torch.equal(out[:, -2], copies["pickle"](tokens, adapter_names=["a"]).logits[:, -1].argmax(-1))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes(backend):
    """No tokens, or out_features = 0: empty outputs and exact (zero) gradients; in_features = 0 is refused."""
    for lead, n in (((0,), 5), ((2, 0), 5), ((4,), 0), ((2, 3), 0)):
        x = torch.randn(*lead, 3, device=DEVICE, requires_grad=True)
        a = torch.randn(4, 3, device=DEVICE, requires_grad=True)
        b = torch.randn(n, 4, device=DEVICE, requires_grad=True)
        y = multi_lora_linear(x, torch.randn(n, 3, device=DEVICE), a, b, torch.zeros(lead, dtype=torch.int64),
                              [1.0, 2.0], bias=torch.randn(n, device=DEVICE), backend=backend)
        assert y.shape == (*lead, n)
        (y * 2).sum().backward()
        assert x.grad.shape == x.shape and not x.grad.any() and not a.grad.any() and b.grad.shape == b.shape
    with pytest.raises(ValueError, match="in_features"):
        multi_lora_linear(torch.randn(5, 0, device=DEVICE), torch.randn(6, 0, device=DEVICE),
                          torch.randn(4, 0, device=DEVICE), torch.randn(6, 4, device=DEVICE), [0] * 5, [1.0, 2.0],
                          backend=backend)
    with pytest.raises(ValueError, match="base_layer: expected in_features >= 1"):
        MultiLoRALinear(torch.nn.Linear(0, 4), 2)
