"""dropout_mask="packed": the forward stores the keep-mask as bits ([M, ceil(in/8)] uint8) and the backward reads
them; same seed, same mask bits, same results as the default "regenerate", on every backend that takes it
(torch, triton, cublas; the cuda backend refuses it before any work)."""
import pytest
import torch

import fastpeft
from fastpeft.dropout import dropout_keep_mask, keep_threshold, pack_keep_mask, unpack_keep_mask

from conftest import DEVICE
from reference_lora import reference_with_grads
from tolerances import assert_close

SEED, P, SCALING = 1234, 0.3, 0.75
BACKENDS = ["torch", "triton", "cublas"]


def _tensors(m, k, n, r, dtype, g):
    x = torch.randn(k, m, generator=g).t().to(DEVICE, dtype).requires_grad_()  # transposed: not contiguous
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(n, r, generator=g).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(n, generator=g).to(DEVICE, dtype).requires_grad_()
    return x, w, a, b, bias, torch.randn(m, n, generator=g).to(DEVICE, dtype)


def _step(x, w, a, b, bias, dy, backend, mode):
    y = fastpeft.lora_linear(x, w, a, b, SCALING, bias, dropout_p=P, seed=SEED, backend=backend, dropout_mask=mode)
    return (y, *torch.autograd.grad(y, (x, a, b, bias), dy))


def _saved_uint8(fn):
    """Run fn(); return the uint8 tensors autograd saved for backward on the way."""
    saved = []

    def pack(t):
        if t.dtype == torch.uint8:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_is_regenerate_bit_for_bit(backend, dtype):
    """Odd in_features (13: the last byte half used), odd rows, a transposed x, a bias: outputs and every gradient
    identical to regenerate's, and within tolerance of the float64 reference under the same mask."""
    m, k, n, r = 37, 13, 29, 5
    x, w, a, b, bias, dy = _tensors(m, k, n, r, dtype, torch.Generator().manual_seed(0))
    regen = _step(x, w, a, b, bias, dy, backend, "regenerate")
    packed, saved = _saved_uint8(lambda: _step(x, w, a, b, bias, dy, backend, "packed"))
    for name, u, v in zip(("y", "dx", "da", "db", "dbias"), regen, packed):
        assert torch.equal(u, v), f"{backend} {dtype}: {name} differs between regenerate and packed"
    y64, (dx64, _, da64, db64, dbias64) = reference_with_grads(x, w, a, b, bias, SCALING, dy, P, SEED)
    for name, got, ref, kk in (("y", packed[0], y64, k), ("dx", packed[1], dx64, n), ("da", packed[2], da64, m),
                               ("db", packed[3], db64, m), ("dbias", packed[4], dbias64, m)):
        assert_close(got, ref, dtype, f"{backend} {name}", k=kk)
    # the saved mask: M·ceil(K/8) bytes, the stream's bits (0 past the last column)
    (mask,) = saved
    assert mask.shape == (m, 2) and mask.numel() * mask.element_size() == m * ((k + 7) // 8)
    assert torch.equal(mask.cpu(), pack_keep_mask(dropout_keep_mask(SEED, m, k, P)))


def test_regenerate_saves_no_mask_and_eval_stores_none():
    x, w, a, b, bias, dy = _tensors(9, 21, 7, 3, torch.float32, torch.Generator().manual_seed(1))
    assert _saved_uint8(lambda: _step(x, w, a, b, bias, dy, "torch", "regenerate"))[1] == []
    y, saved = _saved_uint8(lambda: fastpeft.lora_linear(x, w, a, b, SCALING, bias, P, training=False,
                                                        backend="torch", dropout_mask="packed"))
    assert saved == [] and torch.equal(y, fastpeft.lora_linear(x, w, a, b, SCALING, bias, 0.0, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_row(backend):
    """M = 1 (the triton forward's one-launch decode kernel writes no mask, so a packed call takes the shrink):
    both modes against the float64 reference, the bits the stream's."""
    x, w, a, b, bias, dy = _tensors(1, 19, 11, 4, torch.float32, torch.Generator().manual_seed(2))
    y64, (dx64, _, da64, db64, _) = reference_with_grads(x, w, a, b, bias, SCALING, dy, P, SEED)
    for mode in ("regenerate", "packed"):
        (y, dx, da, db, _), saved = _saved_uint8(lambda: _step(x, w, a, b, bias, dy, backend, mode))
        for name, got, ref in (("y", y, y64), ("dx", dx, dx64), ("da", da, da64), ("db", db, db64)):
            assert_close(got, ref, torch.float32, f"{backend} {mode} {name}")
    assert torch.equal(saved[0].cpu(), pack_keep_mask(dropout_keep_mask(SEED, 1, 19, P)))


def test_module_and_custom_op_thread_the_option():
    """LoRALinear(dropout_mask="packed") and the torch.library ops (lora_linear_traced, run eagerly) give
    regenerate's results at the same seed; the ops' backward gets the forward op's bits."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 10).to(DEVICE)
    layers = {mode: fastpeft.LoRALinear(base, r=4, dropout=P, backend="triton", dropout_mask=mode)
              for mode in ("regenerate", "packed")}
    layers["packed"].load_state_dict(layers["regenerate"].state_dict())
    with torch.no_grad():
        layers["regenerate"].lora_B.normal_()
        layers["packed"].lora_B.copy_(layers["regenerate"].lora_B)
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    results = {}
    for mode, layer in layers.items():
        torch.manual_seed(5)  # the same drawn seed
        y = layer(x)
        results[mode] = (y, *torch.autograd.grad(y.square().sum(), (x, layer.lora_A, layer.lora_B)))
    assert all(torch.equal(u, v) for u, v in zip(results["regenerate"], results["packed"]))
    assert "dropout_mask='packed'" in repr(layers["packed"])

    from fastpeft.ops.lora_linear import lora_linear_traced

    w, bias = base.weight.detach(), base.bias.detach()
    a, b = (layers["packed"].lora_A.detach().requires_grad_(), layers["packed"].lora_B.detach().requires_grad_())
    seed = torch.tensor(SEED)
    op = {mode: lora_linear_traced(x, w, a, b, 0.5, bias, P, seed=seed, backend="triton", dropout_mask=mode)
          for mode in ("regenerate", "packed")}
    grads = {mode: torch.autograd.grad(y.sum(), (x, a, b)) for mode, y in op.items()}
    assert torch.equal(op["regenerate"], op["packed"])
    assert all(torch.equal(u, v) for u, v in zip(grads["regenerate"], grads["packed"]))
    _, _, bits = torch.ops.fastpeft.lora_linear_fwd(x.detach(), w, a.detach(), b.detach(), bias, 0.5, P, seed,
                                                    "triton", "packed")
    assert torch.equal(bits.cpu(), pack_keep_mask(dropout_keep_mask(SEED, 18, 24, P)))


def test_refusals(monkeypatch):
    """A bad value, and packed on the cuda backend (whatever the device: the check is in the Python layer above
    it) or on DoRA / QLoRA layers: clear errors naming the option, before any kernel runs."""
    from fastpeft.ops import lora_linear as ops

    x, w, a, b, bias, _ = _tensors(5, 16, 6, 2, torch.float32, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="dropout_mask"):
        fastpeft.lora_linear(x, w, a, b, 1.0, dropout_p=P, dropout_mask="bits")
    monkeypatch.setattr(ops, "resolve_lora_backend", lambda *args: "cuda")
    monkeypatch.setattr(ops, "_impl", lambda name: pytest.fail("a launcher was reached"))
    with pytest.raises(NotImplementedError, match="dropout_mask='packed'.*'cuda'"):
        fastpeft.lora_linear(x, w, a, b, 1.0, dropout_p=P, backend="cuda", dropout_mask="packed")
    with pytest.raises(NotImplementedError, match="dropout_mask='packed'.*DoRALinear"):
        fastpeft.LoRALinear(torch.nn.Linear(8, 4), r=2, use_dora=True, dropout_mask="packed")


def test_pack_layout_and_mask_count():
    """Bit j of byte c is column 8c+j (the kernels' layout, shared with the PyTorch helpers), and the benchmark's
    mask-only kernel counts the stream's kept elements exactly."""
    keep = torch.zeros(2, 11, dtype=torch.bool)
    keep[0, 0] = keep[0, 9] = keep[1, 7] = True
    bits = pack_keep_mask(keep)
    assert bits.tolist() == [[1, 2], [128, 0]] and torch.equal(unpack_keep_mask(bits, 11), keep)
    from fastpeft.kernels.philox import dropout_count

    cfg = dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
    count = dropout_count(37, 45, SEED, keep_threshold(P), DEVICE, cfg)
    assert int(count) == int(dropout_keep_mask(SEED, 37, 45, P).sum())


def test_dropout_benchmark_runs():
    """benchmarks/bench_dropout.py at its smoke preset (tiny shapes, a few repetitions; its times mean nothing)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_dropout.py")
    spec = importlib.util.spec_from_file_location("bench_dropout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run("smoke")
    assert set(res["step_ms"]) == {"p=0", "p=0.1 regenerate", "p=0.1 packed"}
    assert res["packed_mask_bytes"] == 33 * 5 and res["mask"]["ns_per_element"] >= 0


def test_compiled_packed_matches_eager_regenerate():
    """torch.compile(fullgraph=True) through the custom ops: the forward op returns the bits, the backward op
    reads them; results equal the eager regenerate call's at the same seed."""
    x, w, a, b, bias, dy = _tensors(11, 21, 9, 3, torch.float32, torch.Generator().manual_seed(4))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, a, b, bias):
        return fastpeft.lora_linear(x, w, a, b, SCALING, bias, dropout_p=P, seed=SEED, backend="triton",
                                    dropout_mask="packed")

    y = f(x, w, a, b, bias)
    got = (y, *torch.autograd.grad(y, (x, a, b, bias), dy))
    want = _step(x, w, a, b, bias, dy, "triton", "regenerate")
    assert all(torch.equal(u, v) for u, v in zip(got, want))
