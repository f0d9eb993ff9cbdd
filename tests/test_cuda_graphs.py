"""CUDA graphs and the dropout seed (issue 14): a captured LoRA layer draws a fresh mask on every replay.

A seed that is a Python int is baked into a captured kernel, so every replay would repeat one mask. So the
seed may also be a 0-d int64 tensor on the kernels' device, loaded by the kernels (SEED_PTR) and used by the
PyTorch twin as tensor ops, never read on the host: fastpeft.dropout.draw_seed hands one out while a CUDA
stream is being captured (eager calls), and the compiled path (lora_linear_traced) always draws one on x's
device with torch.randint, so a graph of CUDA tensors holds no CPU op and Inductor's CUDA graphs take it.

On the CPU (Triton under the interpreter): every kernel and the twin give the int seed's mask for the same
value as a tensor; the custom-op path with a tensor seed equals eager with the int; compiled calls draw a
fresh mask per call and each backward uses its own forward's; mode="reduce-overhead" runs and is correct.
On a GPU (skipped here): mode="reduce-overhead" captures the layer in training and in decode, replays draw
fresh masks and match the reference; a manual torch.cuda.graph capture of eager training does the same.
"""
import pytest
import torch
from torch import nn

from fastpeft import LoRALinear, lora_linear
from fastpeft.dropout import SEED_BOUND, draw_seed, dropout_keep_mask, keep_threshold, new_seed
from fastpeft.ops import lora_linear_custom_op  # noqa: F401  (registers the ops)
from fastpeft.ops.lora_linear import lora_linear_traced
from tolerances import assert_close

from conftest import DEVICE

BACKENDS = ["torch", "triton"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _rnd(*shape, dtype=torch.float32, scale=1.0, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _away_from_zero(*shape, g, dtype=torch.float32, device=DEVICE):
    """Entries of magnitude in [0.5, 1.5) and random sign: a dropped entry (0) is never confused with a kept one."""
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return ((torch.rand(*shape, generator=g) + 0.5) * sign).to(device, dtype)


def _drawn_seeds(n: int) -> list[int]:
    """The next n seeds a compiled call draws (torch.randint on DEVICE, as lora_linear_traced does)."""
    return [int(torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=DEVICE)) for _ in range(n)]


def _reference(x, w, a, b, bias, scaling, p, keep, dy):
    """Float64 y and (dx, dA, dB) for the keep-mask `keep` [rows, in] (bool), from the math with autograd."""
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    xd = x64 * keep.reshape(x.shape).double() / (1 - p)
    y = x64 @ w.detach().double().t() + scaling * (xd @ a64.t()) @ b64.t()
    if bias is not None:
        y = y + bias.detach().double()
    y.backward(dy.detach().double())
    return y.detach(), (x64.grad, a64.grad, b64.grad)


# ------------------------------------------------------------------------------------- the seed as a tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_kernel_takes_the_seed_as_a_tensor(dtype):
    """Shrink, the GEMM epilogue's mask (dX) and the dA kernel: a 0-d int64 tensor on the device gives the int
    seed's result bit for bit, and the twin's mask (read off the shrink with A = I and the GEMM with W0 = 0, A = I).
    A tensor's low 32 bits key the stream, in the kernels and in the twin alike."""
    from fastpeft.kernels import lora_linear as k

    g = torch.Generator().manual_seed(0)
    M, K, N, R, p = 37, 40, 24, 8, 0.4
    thr = keep_threshold(p)
    x = _away_from_zero(M, K, g=g, dtype=dtype)
    a, w = _rnd(R, K, dtype=dtype, g=g), _rnd(N, K, dtype=dtype, g=g)
    dy, ds = _rnd(M, N, dtype=dtype, g=g), _rnd(M, R, dtype=dtype, g=g)
    eye = torch.eye(K, device=DEVICE, dtype=dtype)
    for seed, value in ((0, 0), (99, 99), (SEED_BOUND - 1, SEED_BOUND - 1), (5, 2**32 + 5)):
        t = torch.tensor(value, dtype=torch.int64, device=DEVICE)
        assert torch.equal(k.lora_shrink(x, a, p, t, thr), k.lora_shrink(x, a, p, seed, thr))
        inv = 1.0 / (1.0 - p)
        assert torch.equal(k.lora_gemm(dy, w.t(), ds, a.t(), None, inv, (t, thr)),
                           k.lora_gemm(dy, w.t(), ds, a.t(), None, inv, (seed, thr)))
        assert torch.equal(k.lora_bwd_da(x, ds, p, t, thr), k.lora_bwd_da(x, ds, p, seed, thr))

        keep = dropout_keep_mask(seed, M, K, p)
        assert torch.equal(dropout_keep_mask(t, M, K, p).cpu(), keep)
        assert torch.equal((k.lora_shrink(x, eye, p, t, thr) != 0).cpu(), keep)
        ones = torch.ones(M, K, device=DEVICE, dtype=dtype)
        dx = k.lora_gemm(dy, torch.zeros(K, N, device=DEVICE, dtype=dtype), ones, eye, None, inv, (t, thr))
        assert torch.equal((dx != 0).cpu(), keep)


def test_twin_takes_the_seed_as_a_tensor_without_reading_it():
    """dropout_keep_mask(seed, ...) with a 0-d integer tensor (any integer dtype, any device) is the int seed's mask;
    on the meta device it runs too, which proves the seed is never read on the host (no sync on a GPU)."""
    for seed in (0, 7, SEED_BOUND - 1):
        ref = dropout_keep_mask(seed, 23, 45, 0.3)
        assert torch.equal(dropout_keep_mask(torch.tensor(seed), 23, 45, 0.3), ref)
        assert torch.equal(dropout_keep_mask(torch.tensor(seed, dtype=torch.int32), 23, 45, 0.3), ref)
        on_device = dropout_keep_mask(torch.tensor(seed, device=DEVICE), 23, 45, 0.3)
        assert on_device.device.type == DEVICE and torch.equal(on_device.cpu(), ref)
        # a CPU seed for a mask elsewhere
        assert torch.equal(dropout_keep_mask(torch.tensor(seed), 23, 45, 0.3, device=DEVICE).cpu(), ref)
    meta = dropout_keep_mask(torch.tensor(3, device="meta"), 23, 45, 0.3)
    assert meta.device.type == "meta" and meta.shape == (23, 45) and meta.dtype == torch.bool
    for bad in (torch.tensor([1, 2]), torch.tensor(1.0), torch.tensor(True), -1, SEED_BOUND + 1, 1.0, True):
        with pytest.raises(ValueError, match="seed"):
            dropout_keep_mask(bad, 4, 4, 0.5)


def test_int_seed_dropout_launch_on_a_gpu_also_loads_the_tensor_seed_kernel(monkeypatch):
    """Warm-up runs outside capture pass int seeds, while capture passes tensors, and loading a kernel during
    capture is refused by CUDA: so the first int-seed dropout launch of each compiled kernel on a GPU also
    launches its tensor-seed variant on an empty grid (compiled and loaded, no work), once. Checked here with a
    stand-in kernel; on a GPU the manual-capture test below runs the real one."""
    from fastpeft.kernels import launch as k  # the launch helper and its set of loaded variants

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((grid, kwargs["SEED_PTR"], type(kwargs["seed"])))
                return ("compiled", grid[0] > 0, kwargs["SEED_PTR"], kwargs["HAS_DROPOUT"])
            return run

    class OnGpu:
        device = torch.device("cuda")

    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *shape, dtype=None, device=None: zeros(*shape, dtype=dtype))  # no GPU
    monkeypatch.setattr(k, "_TENSOR_SEED_READY", set())
    kernel = Kernel()
    for _ in range(2):
        k._launch(kernel, (3,), OnGpu(), seed=7, HAS_DROPOUT=True, SEED_PTR=False)
    assert launches == [((3,), False, int), ((0,), True, torch.Tensor), ((3,), False, int)]
    launches.clear()
    k._TENSOR_SEED_READY.clear()  # none of these loads a variant: a tensor seed, no dropout, the interpreter
    k._launch(kernel, (3,), OnGpu(), seed=torch.zeros(()), HAS_DROPOUT=True, SEED_PTR=True)
    k._launch(kernel, (3,), OnGpu(), seed=0, HAS_DROPOUT=False, SEED_PTR=False)
    k._launch(kernel, (3,), torch.zeros(1), seed=7, HAS_DROPOUT=True, SEED_PTR=False)
    assert [grid for grid, _, _ in launches] == [(3,)] * 3


def test_draw_seed_is_new_seed_outside_capture():
    """Outside capture (always on the CPU) draw_seed is new_seed: a Python int from torch's CPU generator."""
    for device in (torch.device("cpu"), "cpu", torch.device("meta"), torch.device(DEVICE)):
        torch.manual_seed(5)
        s = draw_seed(device)
        torch.manual_seed(5)
        assert type(s) is int and s == new_seed()


# ------------------------------------------------------------------------ the traced path and the custom ops


def _inputs(g, dtype=torch.float32):
    x = _rnd(9, 3, 21, dtype=dtype, g=g).transpose(0, 1).requires_grad_()  # [3, 9, 21], not contiguous
    w = _rnd(35, 21, dtype=dtype, scale=21 ** -0.5, g=g)
    a = _rnd(6, 21, dtype=dtype, scale=21 ** -0.5, g=g).requires_grad_()
    b = _rnd(35, 6, dtype=dtype, scale=6 ** -0.5, g=g).requires_grad_()
    bias = _rnd(35, dtype=dtype, g=g).requires_grad_()
    return x, w, a, b, bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_path_with_a_tensor_seed_equals_eager_with_the_int(backend):
    """lora_linear_traced (the custom ops, run eagerly) with the seed as a CPU tensor, a tensor on x's device or an
    int gives eager's output and every gradient for that int, bit for bit (the same launchers, one mask)."""
    g = torch.Generator().manual_seed(1)
    x, w, a, b, bias = _inputs(g)
    dy = _rnd(3, 9, 35, g=g)
    leaves = (x, a, b, bias)

    def run(fn, seed):
        y = fn(x, w, a, b, 0.75, bias=bias, dropout_p=0.3, seed=seed, backend=backend)
        return (y.detach(), *torch.autograd.grad(y, leaves, dy))

    ref = run(lora_linear, 1234)
    for seed in (torch.tensor(1234), torch.tensor(1234, device=DEVICE), 1234):
        for got, want, what in zip(run(lora_linear_traced, seed), ref, ("y", "dx", "dA", "dB", "dbias")):
            assert torch.equal(got, want), f"{what} with seed {seed!r}"
    other = run(lora_linear_traced, torch.tensor(1235, device=DEVICE))
    assert not torch.equal(other[0], ref[0])
    with pytest.raises(ValueError, match="seed"):
        lora_linear_traced(x, w, a, b, 0.75, dropout_p=0.3, seed=torch.tensor(5, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="seed"):
        lora_linear_traced(x, w, a, b, 0.75, dropout_p=0.3, seed=torch.tensor([5]), backend=backend)


def test_compiled_graph_holds_the_seed_on_x_device_and_none_without_dropout():
    """Traced on meta tensors (which any host read would break): with dropout the graph draws the seed by one
    torch.randint on x's device, and no tensor in it lives elsewhere (on CUDA x: no CPU op, which would make
    Inductor skip CUDA graphs); an int seed becomes a tensor on x's device; in eval no seed enters the graph."""
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(2)
    x, w, a, b = (t.detach().to("meta") for t in _inputs(g)[:4])
    for kwargs, randint_nodes in (({}, 1), ({"seed": 77}, 0), ({"training": False}, 0)):
        graphs.clear()
        torch._dynamo.reset()
        f = torch.compile(lambda x, w, a, b: lora_linear(x, w, a, b, 0.5, dropout_p=0.25, backend="torch", **kwargs),
                          backend=keep_graph, fullgraph=True)
        assert f(x, w, a, b).device.type == "meta"
        (gm,) = graphs
        nodes = list(gm.graph.nodes)
        assert sum(n.target is torch.randint for n in nodes) == randint_nodes, kwargs
        devices = {v.device.type for n in nodes for v in [n.meta.get("example_value")] if isinstance(v, torch.Tensor)}
        assert devices == {"meta"}, (kwargs, devices)
        (op,) = [n for n in nodes if "lora_linear_fwd" in str(n.target)]
        seed_arg = op.args[7]
        assert (seed_arg is None) == (kwargs.get("training") is False), kwargs


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_calls_draw_fresh_masks_and_each_backward_uses_its_own(backend):
    """torch.compile(fullgraph=True, backend="aot_eager"): two calls draw two seeds (those torch.randint gives
    after torch.manual_seed, recovered so), and each call's gradients, taken after both forwards, match the
    float64 reference built from the twin's mask for that call's seed."""
    g = torch.Generator().manual_seed(3)
    x, w, a, b, bias = _inputs(g)
    dys = [_rnd(3, 9, 35, g=g) for _ in range(2)]
    f = torch.compile(lambda x, a, b: lora_linear(x, w, a, b, 0.75, bias=bias, dropout_p=0.4, backend=backend),
                      fullgraph=True, backend="aot_eager")
    f(x, a, b)  # compile
    torch.manual_seed(21)
    ys = [f(x, a, b), f(x, a, b)]
    torch.manual_seed(21)
    seeds = _drawn_seeds(2)
    keeps = [dropout_keep_mask(s, 27, 21, 0.4) for s in seeds]
    assert seeds[0] != seeds[1] and not torch.equal(keeps[0], keeps[1])
    for i in (1, 0):  # backward in the other order than forward: each must still use its own mask
        grads = torch.autograd.grad(ys[i], (x, a, b), dys[i])
        y64, grads64 = _reference(x, w, a, b, bias, 0.75, 0.4, keeps[i], dys[i])
        assert_close(ys[i], y64, torch.float32, f"call {i} y")
        for got, want, what in zip(grads, grads64, ("dx", "dA", "dB")):
            assert_close(got, want, torch.float32, f"call {i} {what}")


# ---------------------------------------------- a layer whose output shows its mask (any compiler, any device)


D, P = 24, 0.4


def _probe_layer(device, backend=None, p=P):
    """LoRALinear with r = in = out = D, lora_A = I and lora_B = I + noise (invertible, general), a random base
    layer with bias: y - base(x) = s·dropout(x)·Bᵀ, so the mask of any call can be read back from its output."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(D, D)
    with torch.no_grad():
        base.weight.copy_(torch.randn(D, D, generator=g) * D ** -0.5)
        base.bias.copy_(torch.randn(D, generator=g))
    layer = LoRALinear(base, r=D, alpha=1.5 * D, dropout=p, backend=backend)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(D))
        layer.lora_B.copy_(torch.eye(D) + 0.1 * torch.randn(D, D, generator=g))
    return layer.to(device)


def _mask_of(layer, x, y, p=P):
    """The keep-mask [rows, D] a call of _probe_layer applied, solved from its output, checked to be one."""
    x2, y2 = x.detach().reshape(-1, D).double(), y.detach().reshape(-1, D).double()
    base = layer.base_layer
    low = (y2 - x2 @ base.weight.double().t() - base.bias.double()) / layer.scaling  # dropout(x)·Aᵀ·Bᵀ, A = I
    xd = torch.linalg.solve(layer.lora_B.detach().double(), low.t()).t()
    keep = xd.abs() > 0.5 * x2.abs() / (1 - p)
    torch.testing.assert_close(xd, torch.where(keep, x2 / (1 - p), torch.zeros_like(x2)), atol=1e-3, rtol=1e-3)
    return keep


def _train_steps(fn, layer, steps, device, mark_step=False):
    """(mask, y, (dx, dA, dB), dy) of `steps` training calls of fn, each checked against the float64 reference of
    the mask read from its own output; every result is cloned at once (CUDA graph outputs are overwritten)."""
    g = torch.Generator().manual_seed(4)
    results = []
    for _ in range(steps):
        x = _away_from_zero(2, 5, D, g=g, device=device).requires_grad_()
        dy = torch.randn(2, 5, D, generator=g).to(device)
        layer.zero_grad(set_to_none=True)
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        y = fn(x)
        y.backward(dy)
        y, grads = y.detach().clone(), (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        keep = _mask_of(layer, x, y)
        y64, grads64 = _reference(x, layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.base_layer.bias,
                                  layer.scaling, P, keep, dy)
        assert_close(y, y64, torch.float32, "y")
        for got, want, what in zip(grads, grads64, ("dx", "dA", "dB")):
            assert_close(got, want, torch.float32, what)
        results.append(keep)
    for i in range(steps):
        for j in range(i):
            assert not torch.equal(results[i], results[j]), f"steps {j} and {i} share a mask"
    return results


def test_reduce_overhead_runs_and_is_correct_on_cpu():
    """torch.compile(model, mode="reduce-overhead") (Inductor) of a LoRALinear with dropout, training: on the
    CPU there is no CUDA graph to capture (Inductor skips cudagraphs for CPU graphs and runs the compiled code),
    so this checks what the CPU can: the compile runs, each call draws a fresh mask, and each call's outputs and
    gradients match the float64 reference of its own mask. The capture itself: the CUDA tests below."""
    torch._dynamo.reset()
    layer = _probe_layer("cpu", backend="torch")
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    _train_steps(compiled, layer, 3, "cpu")


# ------------------------------------------------------------------------------------------ on a CUDA device


def _no_cudagraph_skips():
    """Inductor raises instead of skipping cudagraphs for a graph (where this torch has the switch)."""
    import contextlib

    import torch._inductor.config

    if not hasattr(torch._inductor.config.triton, "cudagraph_or_error"):
        return contextlib.nullcontext()
    return torch._inductor.config.patch({"triton.cudagraph_or_error": True})


def _cudagraph_roots() -> int:
    from torch._inductor import cudagraph_trees

    mgr = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    return 0 if mgr is None else sum(1 for _ in mgr.get_roots())


@needs_cuda
def test_reduce_overhead_captures_training_and_replays_fresh_masks():
    """mode="reduce-overhead" on CUDA: the LoRA layer's forward and backward graphs are captured (Inductor neither
    skips cudagraphs, which cudagraph_or_error turns into an error, nor counts a skip), every replay draws a fresh
    mask, and each replay's outputs and gradients match the float64 reference of its own mask."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = _probe_layer("cuda", backend="triton")
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with _no_cudagraph_skips():
        _train_steps(compiled, layer, 6, "cuda", mark_step=True)  # warm-up, record, then replays
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert _cudagraph_roots() > 0


@needs_cuda
def test_reduce_overhead_captures_eval_decode():
    """mode="reduce-overhead" of a LoRALinear in eval, decode-shaped (one token): captured (no seed, no RNG op in
    the graph), and every replay equals the eager layer for its own input."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(5)
    layer = LoRALinear(nn.Linear(64, 48), r=8, alpha=16, dropout=0.2, backend="triton").cuda().eval()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(48, 8, generator=g) * 0.1)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad(), _no_cudagraph_skips():
        for _ in range(5):
            x = torch.randn(1, 1, 64, generator=g).cuda()
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x).clone()
            ref = x.double() @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double() + \
                layer.scaling * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
            assert_close(y, ref, torch.float32, "decode y")
            torch.testing.assert_close(y, layer(x))
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert _cudagraph_roots() > 0


def _capture_training(fn, layer, replays):
    """Manual torch.cuda.graph capture of one eager training step (forward and backward), after a warm-up on a
    side stream as torch.cuda.graph asks; returns the masks of `replays` replays, each checked against the
    float64 reference of its own mask."""
    g = torch.Generator().manual_seed(6)
    x = _away_from_zero(2, 5, D, g=g, device="cuda").requires_grad_()
    dy = torch.randn(2, 5, D, generator=g).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            fn(x).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x)
        y.backward(dy)
    masks = []
    for _ in range(replays):
        graph.replay()
        torch.cuda.synchronize()
        keep = _mask_of(layer, x, y)
        y64, grads64 = _reference(x, layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.base_layer.bias,
                                  layer.scaling, P, keep, dy)
        assert_close(y, y64, torch.float32, "replayed y")
        for got, want, what in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), grads64, ("dx", "dA", "dB")):
            assert_close(got, want, torch.float32, f"replayed {what}")
        masks.append(keep)
    for i in range(replays):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j]), f"replays {j} and {i} share a mask"
    return masks


@needs_cuda
@pytest.mark.parametrize("call", ["module", "functional"])
def test_manual_cuda_graph_capture_of_eager_training_replays_fresh_masks(call):
    """torch.cuda.graph around an eager LoRALinear (or fastpeft.lora_linear) training step: the seed drawn inside
    capture is a device tensor from CUDA's graph-safe generator, so each replay has its own mask, and backward
    (captured too) regenerates that replay's mask."""
    layer = _probe_layer("cuda", backend="triton")
    if call == "module":
        fn = layer
    else:
        def fn(x):
            return lora_linear(x, layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling,
                               bias=layer.base_layer.bias, dropout_p=P, backend="triton")
    _capture_training(fn, layer, 4)


@needs_cuda
def test_tensor_seed_paths_never_sync():
    """With the seed on the GPU, the twin and the custom-op path (Triton and PyTorch backends) run with torch's
    sync debug mode set to raise on any synchronisation."""
    g = torch.Generator().manual_seed(7)
    x, w, a, b, bias = _inputs(g)
    seed = torch.tensor(42, device="cuda")

    def run():
        dropout_keep_mask(seed, 27, 21, 0.3)
        for backend in BACKENDS:
            y = lora_linear_traced(x, w, a, b, 0.5, bias=bias, dropout_p=0.3, seed=seed, backend=backend)
            y.backward(torch.ones_like(y))

    run()  # compiles the kernels first
    torch.cuda.synchronize()
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(saved)


@needs_cuda
def test_cuda_backend_refuses_a_seed_inside_capture():
    """backend="cuda" takes its seed on the host: inside capture it raises instead of baking one mask in."""
    from fastpeft._backend import cuda_unavailable_reason

    reason = cuda_unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(8)
    x, w, a, b, bias = (t.detach() for t in _inputs(g))
    lora_linear(x, w, a, b, 0.5, dropout_p=0.3, backend="cuda")  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot take a dropout seed inside CUDA graph capture"):
        with torch.cuda.graph(graph):
            lora_linear(x, w, a, b, 0.5, dropout_p=0.3, backend="cuda")
