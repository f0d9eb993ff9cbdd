"""The C++ CPU dropout kernels (fastpeft._C_cpu, csrc/cpu/) against the PyTorch twin of the stream, bit for bit.

Every instruction set this CPU runs (avx512, avx2, generic) is checked, for fp32/fp16/bf16, odd shapes, any
strides and the edge thresholds; then the loader's fallback and switch, the bindings' errors, and the whole LoRA
op with and without the C++ path. The extension is built by setup.py (or just in time); where it cannot load
these tests skip, except under CI, where a missing extension fails.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import fastpeft
from fastpeft import _ext_cpu, dropout_cpu
from fastpeft.dropout import SEED_BOUND, dropout_keep_mask, keep_threshold
from fastpeft.dropout_cpu import twin_dropped

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
SHAPES = [(1, 1), (1, 7), (5, 1), (3, 13), (4, 64), (33, 1030), (2, 2053)]
SEEDS = (0, 7, SEED_BOUND)
PS = (0.1, 0.5, 0.9)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (torch.equal) and equal bits (-0.0 is not +0.0)."""
    return (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            and torch.equal(a.contiguous().view(INT_VIEW[a.dtype]), b.contiguous().view(INT_VIEW[b.dtype])))


def values(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values with the awkward ones mixed in: ±0, ±inf, subnormals, the dtype's max, rounding ties."""
    x = torch.randn(rows, cols, generator=gen) * 10
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), torch.finfo(dtype).max, -torch.finfo(dtype).max,
                            torch.finfo(dtype).tiny, torch.finfo(dtype).tiny / 4, 1.0, -1.5, 0.9, 1e-3])
    flat = x.view(-1)
    idx = torch.randint(0, flat.numel(), (min(flat.numel(), 3 * len(special)),), generator=gen)
    flat[idx] = special.repeat(3)[: idx.numel()]
    return x.to(dtype)


@pytest.fixture(scope="module")
def ext():
    mod, why = _ext_cpu.status()
    if mod is None:
        pytest.skip(f"fastpeft._C_cpu is not available: {why}")
    return mod


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa(request, ext):
    """Run a test once per instruction set the extension can use here; the CPU's best is restored after."""
    if request.param not in ext.available_isas().split(","):
        pytest.skip(f"this CPU or build does not run {request.param} (available: {ext.available_isas()})")
    before = ext.set_isa(request.param)
    yield request.param
    ext.set_isa(before)


def test_extension_is_built_under_ci():
    """CI installs with setup.py, which must build fastpeft._C_cpu: a missing extension there is a failure."""
    if not os.environ.get("CI"):
        pytest.skip("CI is not set: the extension is optional outside CI")
    mod, why = _ext_cpu.prebuilt_status()
    assert mod is not None, f"CI: setup.py did not build fastpeft._C_cpu: {why}"
    assert _ext_cpu.get() is not None, _ext_cpu.status()[1]


# ---- the stream and the arithmetic, bit for bit ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropped_is_bit_identical_to_the_twin(ext, isa, dtype):
    gen = torch.Generator().manual_seed(0)
    for rows, cols in SHAPES:
        x = values(rows, cols, dtype, gen)
        for p in PS:
            for seed in SEEDS:
                got = ext.dropped(x, seed, keep_threshold(p), 1.0 / (1.0 - p))
                assert same_bits(got, twin_dropped(x, p, seed)), (rows, cols, p, seed)
                assert got.is_contiguous()


def test_keep_mask_matches_the_twin_at_every_threshold(ext, isa):
    p_max = 1 - 2.0**-33  # keep_threshold(p_max) == 2**31 - 1, the largest threshold
    assert keep_threshold(p_max) == SEED_BOUND and keep_threshold(0.0) == 0
    for p in (0.0, 0.1, 0.5, 0.9, p_max):
        for seed in SEEDS:
            for rows, cols in [(1, 1), (7, 9), (40, 1030)]:
                got = ext.keep_mask(seed, rows, cols, keep_threshold(p))
                assert got.dtype == torch.bool and torch.equal(got, dropout_keep_mask(seed, rows, cols, p)), (p, seed)
    assert bool(ext.keep_mask(3, 8, 64, 0).all()), "thr 0 keeps everything"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_16_bit_value_rounds_as_torch_does(ext, isa, dtype):
    """All 65536 bit patterns (NaNs aside) through the widen-multiply-round path, for several scales."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    x = torch.where(torch.isnan(x), torch.zeros((), dtype=dtype), x)
    for p in (0.1, 0.3, 0.7, 1 / 3):
        assert same_bits(ext.dropped(x, 11, keep_threshold(p), 1.0 / (1.0 - p)), twin_dropped(x, p, 11)), p
    # thr 0 keeps every element, so every pattern is multiplied (p = 0 itself has scale 1: check a scale too)
    assert same_bits(ext.dropped(x, 11, 0, 1.25), x * 1.25)


def test_nan_stays_nan_where_kept(ext):
    x = torch.full((4, 37), float("nan"))
    for dtype in DTYPES:
        got = ext.dropped(x.to(dtype), 5, keep_threshold(0.5), 2.0)
        keep = dropout_keep_mask(5, 4, 37, 0.5)
        assert torch.isnan(got[keep]).all() and (got[~keep] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_strides(ext, isa, dtype):
    gen = torch.Generator().manual_seed(1)
    base = values(40, 90, dtype, gen)
    cases = {
        "transposed": values(90, 40, dtype, gen).t(),
        "sliced": base[3:30:2, 5:83:3],
        "row_slice_offset": base[7:, 11:],
        "expanded_rows": values(1, 77, dtype, gen).expand(21, 77),
        "expanded_cols": values(19, 1, dtype, gen).expand(19, 66),
        "all_one_element": values(1, 1, dtype, gen).expand(9, 130),
        "column_step_7": base[:, ::7],
    }
    for name, x in cases.items():
        for p, seed in [(0.1, 0), (0.5, 99), (0.9, SEED_BOUND)]:
            got = ext.dropped(x, seed, keep_threshold(p), 1.0 / (1.0 - p))
            assert got.is_contiguous() and got.data_ptr() != x.data_ptr(), name
            assert same_bits(got, twin_dropped(x, p, seed)), (name, p, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropped_pair_equals_two_twin_calls(ext, isa, dtype):
    gen = torch.Generator().manual_seed(2)
    for rows, cols in [(1, 1), (3, 13), (33, 1030)]:
        x = values(cols, rows, dtype, gen).t()  # transposed x, contiguous low
        low = values(rows, cols, dtype, gen)
        for p, seed in [(0.1, 3), (0.9, 0), (0.5, SEED_BOUND)]:
            x0, low0 = x.clone(), low.clone()
            work = low.clone()
            xd = ext.dropped_pair(x, work, seed, keep_threshold(p), 1.0 / (1.0 - p))
            assert same_bits(xd, twin_dropped(x0, p, seed))
            assert same_bits(work, twin_dropped(low0, p, seed))
            assert same_bits(x, x0), "x must not be modified"


def test_outputs_are_fresh_and_fully_written(ext):
    """Memory that held NaNs is handed back to the allocator before each call: a skipped store would show."""
    for dtype in DTYPES:
        x = values(67, 515, dtype, torch.Generator().manual_seed(3))
        x0 = x.clone()
        for _ in range(3):
            del_me = torch.full((67, 515), float("nan"), dtype=dtype)
            del del_me
            got = ext.dropped(x, 17, keep_threshold(0.3), 1 / 0.7)
            assert same_bits(got, twin_dropped(x0, 0.3, 17))
            assert got.data_ptr() != x.data_ptr()
        assert same_bits(x, x0), "x must not be modified"


def test_threads_split_rows_without_changing_a_bit(ext):
    x = values(300, 700, torch.float32, torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ext.dropped(x, 21, keep_threshold(0.2), 1 / 0.8))
    finally:
        torch.set_num_threads(before)
    want = twin_dropped(x, 0.2, 21)
    assert all(same_bits(o, want) for o in outs)


def test_empty_tensors(ext):
    for shape in [(0, 5), (4, 0), (0, 0)]:
        x = torch.randn(shape)
        assert ext.dropped(x, 1, keep_threshold(0.5), 2.0).shape == shape
        low = torch.randn(shape)
        assert ext.dropped_pair(x, low, 1, keep_threshold(0.5), 2.0).shape == shape
        assert ext.keep_mask(1, *shape, 5).shape == shape


# ---- the Python layer: which path runs, the fallback, the switch -------------------------------------------
def test_dropout_cpu_takes_the_cpp_path_for_cpu_int_seeds(ext, monkeypatch):
    calls = []
    real = ext.dropped
    monkeypatch.setattr(_ext_cpu, "_cached", type("Spy", (), {
        "dropped": staticmethod(lambda *a: calls.append("dropped") or real(*a)),
        "dropped_pair": staticmethod(ext.dropped_pair)})())
    x = torch.randn(6, 10)
    assert same_bits(dropout_cpu.dropped(x, 0.25, 4), twin_dropped(x, 0.25, 4)) and calls == ["dropped"]
    # to the twin: float64, a tensor seed, a graph through the result
    for args in [(x.double(), 0.25, 4), (x, 0.25, torch.tensor(4)), (x.clone().requires_grad_(), 0.25, 4)]:
        out = dropout_cpu.dropped(*args)
        assert torch.equal(out.detach(), twin_dropped(args[0], 0.25, 4).detach())
    assert calls == ["dropped"]
    xg = x.clone().requires_grad_()
    dropout_cpu.dropped(xg, 0.25, 4).sum().backward()
    assert torch.equal(xg.grad, twin_dropped(torch.ones_like(x), 0.25, 4)), "the twin path stays differentiable"


def test_dropped_pair_python_layer(ext):
    x = torch.randn(9, 30).t()
    low = torch.randn(30, 9)
    low0 = low.clone()
    xd, low_d = dropout_cpu.dropped_pair(x, low, 0.4, 8)
    assert low_d is low, "the C++ path scales low in place"
    assert same_bits(xd, twin_dropped(x, 0.4, 8)) and same_bits(low_d, twin_dropped(low0, 0.4, 8))
    # mismatched dtypes go to the twin, which returns a new tensor and leaves low alone
    low16 = low0.to(torch.bfloat16)
    xd, low_d = dropout_cpu.dropped_pair(x, low16, 0.4, 8)
    assert low_d is not low16 and same_bits(low16, low0.to(torch.bfloat16))
    assert same_bits(low_d, twin_dropped(low16, 0.4, 8))


def _forget_decision(monkeypatch):
    monkeypatch.setattr(_ext_cpu, "_cached", _ext_cpu._UNRESOLVED)
    monkeypatch.setattr(_ext_cpu, "_reason", None)
    monkeypatch.setattr(_ext_cpu, "_warned", False)


def test_fallback_warns_once_and_gives_the_same_bits(monkeypatch):
    _forget_decision(monkeypatch)
    monkeypatch.delenv(_ext_cpu.ENV_KERNELS, raising=False)
    monkeypatch.setattr(_ext_cpu, "_load", lambda: (None, "no C++ compiler was found (test)"))
    x = torch.randn(12, 33).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = dropout_cpu.dropped(x, 0.3, 5)
        b, low = dropout_cpu.dropped_pair(x, x.clone(), 0.3, 5)
        c = dropout_cpu.dropped(x, 0.3, 5)
    ours = [w for w in caught if issubclass(w.category, _ext_cpu.CpuKernelsWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler was found (test)" in str(ours[0].message) and "slower" in str(ours[0].message)
    want = twin_dropped(x, 0.3, 5)
    assert same_bits(a, want) and same_bits(b, want) and same_bits(low, want) and same_bits(c, want)
    assert _ext_cpu.status() == (None, "no C++ compiler was found (test)")


def test_switch_off_uses_the_twin_without_a_warning(monkeypatch):
    _forget_decision(monkeypatch)
    monkeypatch.setenv(_ext_cpu.ENV_KERNELS, "0")
    monkeypatch.setattr(_ext_cpu, "_load", lambda: pytest.fail("FASTPEFT_CPU_KERNELS=0 must not load anything"))
    x = torch.randn(5, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_bits(dropout_cpu.dropped(x, 0.5, 2), twin_dropped(x, 0.5, 2))
    assert _ext_cpu.get() is None and "FASTPEFT_CPU_KERNELS=0" in _ext_cpu.status()[1]
    assert _ext_cpu.disabled({"FASTPEFT_CPU_KERNELS": "off"}) and not _ext_cpu.disabled({})


def test_build_mode_variable():
    cfg = _ext_cpu._build_config()
    assert cfg.cpu_build_mode({}) == "auto"
    assert cfg.cpu_build_mode({"FASTPEFT_BUILD_CPU": "0"}) == "never"
    assert cfg.cpu_build_mode({"FASTPEFT_BUILD_CPU": "1"}) == "force"
    with pytest.raises(ValueError, match="FASTPEFT_BUILD_CPU.*'maybe'"):
        cfg.cpu_build_mode({"FASTPEFT_BUILD_CPU": "maybe"})
    assert not any(f.startswith("-march") for f in cfg.CPU_CXX_FLAGS), "a built binary must run on any x86-64"
    on_disk = sorted(f for f in os.listdir(cfg.CPU_DIR) if f.endswith((".cpp", ".cc", ".c")))
    assert on_disk == sorted(cfg.CPU_SOURCES), "csrc/build_config.py CPU_SOURCES must list every source in csrc/cpu/"


# ---- errors -------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(ext):
    x, thr = torch.randn(4, 6), keep_threshold(0.5)
    cases = [
        (lambda: ext.dropped(torch.empty(4, 6, device="meta"), 1, thr, 2.0), ValueError, "x: expected a CPU tensor, got device meta"),
        (lambda: ext.dropped(x.double(), 1, thr, 2.0), TypeError, "x: expected dtype float32, float16 or bfloat16, got Double"),
        (lambda: ext.dropped(torch.randn(2, 3, 4), 1, thr, 2.0), ValueError, r"x: expected a 2-D tensor, got shape \[2, 3, 4\]"),
        (lambda: ext.dropped(x, -1, thr, 2.0), ValueError, r"seed: expected an int in \[0, 2147483647\], got -1"),
        (lambda: ext.dropped(x, 2**31, thr, 2.0), ValueError, r"seed: expected an int in \[0, 2147483647\], got 2147483648"),
        (lambda: ext.dropped(x, 1, -1, 2.0), ValueError, r"thr: expected an int in \[0, 2147483647\].*got -1"),
        (lambda: ext.dropped(x, 1, 2**31, 2.0), ValueError, "thr: expected.*got 2147483648"),
        (lambda: ext.dropped(x, 1, thr, float("inf")), ValueError, "scale: expected a finite float"),
        (lambda: ext.dropped(x.clone().requires_grad_(), 1, thr, 2.0), ValueError, "x: expected a tensor that does not require grad"),
        (lambda: ext.dropped_pair(x, torch.randn(4, 7), 1, thr, 2.0), ValueError, r"low: expected shape \[4, 6\] \(that of x\), got \[4, 7\]"),
        (lambda: ext.dropped_pair(x, torch.randn(4, 6).half(), 1, thr, 2.0), TypeError, r"low: expected dtype Float \(that of x\), got Half"),
        (lambda: ext.dropped_pair(x, torch.randn(6, 4).t(), 1, thr, 2.0), ValueError, "low: expected a contiguous tensor"),
        (lambda: ext.dropped_pair(x, x, 1, thr, 2.0), ValueError, "low: expected memory that does not overlap x's"),
        (lambda: ext.dropped_pair(x, torch.randn(4, 6, device="meta"), 1, thr, 2.0), ValueError, "low: expected a CPU tensor"),
        (lambda: ext.keep_mask(1, -2, 5, thr), ValueError, "rows: expected 0 <= rows < 2\\*\\*32"),
        (lambda: ext.keep_mask(SEED_BOUND + 1, 2, 5, thr), ValueError, "seed: expected"),
        (lambda: ext.set_isa("sse9"), ValueError, "name: expected one of the instruction sets.*got 'sse9'"),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()
    low = torch.randn(4, 6)
    low0 = low.clone()
    with pytest.raises(ValueError):
        ext.dropped_pair(x, low, -1, thr, 2.0)
    assert same_bits(low, low0), "nothing may be written on an error path"


# ---- the whole op ---------------------------------------------------------------------------------------------
def _op_outputs(x, w, a, b, bias, seed, p, requires):
    leaves = {"x": x, "a": a, "b": b, "bias": bias}
    leaves = {k: v if v is None else v.detach().clone().requires_grad_(k in requires) for k, v in leaves.items()}
    y = fastpeft.lora_linear(leaves["x"], w, leaves["a"], leaves["b"], 0.5, leaves["bias"], dropout_p=p, seed=seed,
                             backend="torch")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    y.backward(dy)
    return [y.detach()] + [leaves[k].grad for k in sorted(requires)]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires", [("x", "a", "b", "bias"), ("a",), ("x",), ("x", "b")], ids="+".join)
def test_lora_linear_torch_backend_same_bits_with_and_without_cpp(ext, monkeypatch, dtype, requires, p):
    """The C++ passes (lora_fwd / lora_bwd, csrc/cpu/lora_cpu.cpp) against the Python ops they replace."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 130, generator=gen).to(dtype)[:, :, 1:]  # [3, 7, 129] non-contiguous rows
    w = torch.randn(45, 129, generator=gen).to(dtype)
    a = torch.randn(8, 129, generator=gen).to(dtype)
    b = torch.randn(45, 8, generator=gen).to(dtype)
    bias = torch.randn(45, generator=gen).to(dtype)
    with_cpp = _op_outputs(x, w, a, b, bias, 1234, p, requires)
    monkeypatch.setattr(_ext_cpu, "_cached", None)  # the twin, as when the extension is unavailable
    twin = _op_outputs(x, w, a, b, bias, 1234, p, requires)
    assert len(with_cpp) == len(twin) == 1 + len(requires)
    for got, want in zip(with_cpp, twin):
        assert same_bits(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cpp_passes_with_fp32_adapters_no_bias_and_inference(ext, monkeypatch, dtype, p):
    """fp32 adapters over 16-bit activations (gradients come back in fp32), no bias, M=1 and a no-grad call."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(33, 40, generator=gen).to(dtype)[:, ::2]  # [33, 20] strided
    w = torch.randn(17, 20, generator=gen).to(dtype)
    a, b = torch.randn(3, 20, generator=gen), torch.randn(17, 3, generator=gen)

    def run():
        out = _op_outputs(x, w, a, b, None, 77, p, ("x", "a", "b"))
        with torch.no_grad():
            out.append(fastpeft.lora_linear(x[:1], w, a, b, 0.5, None, dropout_p=p, seed=77, backend="torch"))
        return out

    with_cpp = run()
    assert with_cpp[1].dtype == with_cpp[2].dtype == torch.float32 and with_cpp[3].dtype == dtype  # dA, dB; dX
    monkeypatch.setattr(_ext_cpu, "_cached", None)
    for got, want in zip(with_cpp, run()):
        assert same_bits(got, want)


def test_cpp_passes_are_taken(ext, monkeypatch):
    """lora_linear_fwd/bwd_torch call the extension on CPU rows with an int seed, never under a grad graph."""
    from fastpeft.ops import lora_linear_torch as lt

    calls = []
    spy = type("Spy", (), {name: staticmethod(lambda *a, _n=name: (calls.append(_n), getattr(ext, _n)(*a))[1])
                           for name in ("lora_fwd", "lora_bwd", "dropped", "dropped_pair")})
    monkeypatch.setattr(_ext_cpu, "_cached", spy)
    x = torch.randn(4, 9, requires_grad=True)
    w, a, b = torch.randn(6, 9), torch.randn(2, 9, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    fastpeft.lora_linear(x, w, a, b, 2.0, dropout_p=0.1, backend="torch").sum().backward()
    assert calls == ["lora_fwd", "lora_bwd"]
    calls.clear()
    y = fastpeft.lora_linear(x, w, a, b, 2.0, dropout_p=0.1, seed=3, backend="torch")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)  # double backward: differentiable torch ops
    assert "lora_bwd" not in calls and gx.requires_grad
    with torch.no_grad():
        lt.lora_linear_fwd_torch(x, w, a, b, None, 2.0, 0.1, torch.tensor(3), 0)  # a tensor seed: the twin
    assert calls == ["lora_fwd"]


def test_cuda_backend_import_of_dropped_still_works():
    from fastpeft.ops import lora_linear_torch

    x, keep = torch.randn(3, 8), dropout_keep_mask(4, 3, 8, 0.5)
    assert same_bits(lora_linear_torch._dropped(x, 0.5, 4, keep), twin_dropped(x, 0.5, 4))
    assert same_bits(lora_linear_torch._dropped(x, 0.5, 4), twin_dropped(x, 0.5, 4))


def test_info_reports_the_cpu_extension():
    from fastpeft import info

    line = [ln for ln in info.report().splitlines() if ln.startswith("extension fastpeft._C_cpu: ")]
    assert len(line) == 1
    mod, _ = _ext_cpu.prebuilt_status()
    if mod is not None and not _ext_cpu.disabled():
        assert f"run with {mod.isa()}" in line[0]


# ---- the whole layer as one C++ autograd node (fastpeft._C_cpu.lora_apply) ------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires", [("x", "a", "b", "bias"), ("a", "b"), ("x",), ("bias",)], ids="+".join)
def test_autograd_node_matches_the_python_function_bit_for_bit(ext, monkeypatch, dtype, requires, p):
    """lora_apply (forward and backward in C++) against LoRALinearFunction over the same passes."""
    from fastpeft.ops import lora_linear as ll

    assert ll.cpu_autograd_node("torch", torch.device("cpu")) is ext.lora_apply
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 50, generator=gen).to(dtype).transpose(0, 1)  # [3, 2, 50]: rows not one stride
    w = torch.randn(21, 50, generator=gen).to(dtype)
    a = torch.randn(4, 50, generator=gen).to(dtype)
    b = torch.randn(21, 4, generator=gen).to(dtype)
    bias = torch.randn(21, generator=gen).to(dtype)
    node = _op_outputs(x, w, a, b, bias, 99, p, requires)
    monkeypatch.setattr(ll, "cpu_autograd_node", lambda *args: None)
    function = _op_outputs(x, w, a, b, bias, 99, p, requires)
    for got, want in zip(node, function):
        assert same_bits(got, want)


def test_modules_train_through_the_node(ext, monkeypatch):
    """LoRALinear and patch_peft layers take the node in training (their cached hot path), a no-grad call the
    forward pass alone; a tensor seed (CUDA graph capture) would take the Python Function."""
    calls = []
    spy = type("Spy", (), {name: staticmethod(lambda *a, _n=name: (calls.append(_n), getattr(ext, _n)(*a))[1])
                           for name in ("lora_fwd", "lora_bwd", "lora_apply", "dropped", "dropped_pair")})
    monkeypatch.setattr(_ext_cpu, "_cached", spy)
    layer = fastpeft.LoRALinear(torch.nn.Linear(12, 7), r=2, dropout=0.2)
    x = torch.randn(5, 12, requires_grad=True)
    layer(x).sum().backward()
    assert calls == ["lora_apply"] and x.grad is not None and layer.lora_A.grad is not None
    calls.clear()
    with torch.no_grad():
        layer.eval()(x)
    assert calls == ["lora_fwd"]
