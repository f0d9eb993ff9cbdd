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
