"""torch.library.opcheck of every fastpeft custom op: schema, fake implementation (shapes, dtypes, strides
under symbolic sizes), autograd registration and AOT dispatch, as torch.library checks them.

Every op in both backends (torch, and triton: CUDA or the interpreter on CPU) and in fp32 and fp16, on small
odd shapes with non-contiguous activations. What the compiled graphs compute is tested in test_compile.py.
"""
import subprocess
import sys

import pytest
import torch

from fastpeft import galore  # importing fastpeft registers the ops (test_import_fastpeft_registers_every_op)
from fastpeft.ops import galore_linear_custom_op

from conftest import DEVICE

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]
OPS = ["lora_linear", "bottleneck_adapter", "ia3_linear", "multi_lora_linear", "galore_linear"]
M_LEAD, D_IN, D_OUT = (3, 5), 21, 13  # M = 15 rows
DEFAULT_UTILS = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]


def _rnd(*shape, dtype, g, scale=1.0, grad=False):
    t = (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
    return t.requires_grad_() if grad else t


def _x(dtype, g, d=D_IN, grad=True):
    # [3, 5, d] as a transposed view: not contiguous, and its rows are still one stride apart
    return _rnd(M_LEAD[1], M_LEAD[0], d, dtype=dtype, g=g).transpose(0, 1).requires_grad_(grad)


def _lora_cases(backend, dtype, g):
    x = _x(dtype, g)
    w = _rnd(D_OUT, D_IN, dtype=dtype, g=g, scale=D_IN ** -0.5)
    a = _rnd(6, D_IN, dtype=dtype, g=g, scale=D_IN ** -0.5, grad=True)
    b = _rnd(6, D_OUT, dtype=dtype, g=g, scale=0.4).t().requires_grad_()  # transposed
    bias = _rnd(D_OUT, dtype=dtype, g=g, grad=True)
    seed = torch.tensor(77)
    fwd, bwd = torch.ops.fastpeft.lora_linear_fwd.default, torch.ops.fastpeft.lora_linear_bwd.default
    s = fwd(x.detach(), w, a.detach(), b.detach(), bias.detach(), 0.5, 0.25, seed, backend)[1]
    dy = _rnd(15, D_OUT, dtype=dtype, g=g)
    return [(fwd, (x, w, a, b, bias, 0.5, 0.25, seed, backend)),
            (fwd, (x, w, a, b, None, 0.5, 0.0, seed, backend)),
            (bwd, (dy, x.detach(), w, a.detach(), b.detach(), s, 0.5, 0.25, seed, True, True, True, True, backend)),
            (bwd, (dy, x.detach(), w, a.detach(), b.detach(), s, 0.5, 0.25, seed, False, True, False, False, backend))]


def _adapter_cases(backend, dtype, g):
    d, a_ = D_IN, 6
    x = _x(dtype, g)
    res = _x(dtype, g)
    wd = _rnd(a_, d, dtype=dtype, g=g, scale=d ** -0.5, grad=True)
    bd = _rnd(a_, dtype=dtype, g=g, grad=True)
    wu = _rnd(a_, d, dtype=dtype, g=g, scale=0.4).t().requires_grad_()  # transposed
    bu = _rnd(d, dtype=dtype, g=g, grad=True)
    fwd, bwd = torch.ops.fastpeft.bottleneck_adapter_fwd.default, torch.ops.fastpeft.bottleneck_adapter_bwd.default
    _, z = fwd(x.detach(), None, wd.detach(), bd.detach(), wu.detach(), bu.detach(), 0.7, "gelu", True, backend)
    dy = _rnd(*M_LEAD, d, dtype=dtype, g=g)
    return [(fwd, (x, None, wd, bd, wu, bu, 0.7, "gelu", True, backend)),
            (fwd, (x, res, wd, None, wu, None, 1.5, "silu", True, backend)),
            (fwd, (x.detach(), None, wd.detach(), None, wu.detach(), None, 0.7, "relu", False, backend)),
            (bwd, (dy, x.detach(), z, wd.detach(), wu.detach(), 0.7, "gelu", True, True, True, backend)),
            (bwd, (dy, x.detach(), z, wd.detach(), wu.detach(), 0.7, "gelu", False, False, True, backend))]


def _ia3_cases(backend, dtype, g):
    x = _x(dtype, g)
    w = _rnd(D_OUT, D_IN, dtype=dtype, g=g, scale=D_IN ** -0.5)
    bias = _rnd(D_OUT, dtype=dtype, g=g)
    l_out = (1 + 0.3 * torch.randn(D_OUT, generator=g)).to(DEVICE).requires_grad_()  # fp32 vector
    l_in = (1 + 0.3 * torch.randn(D_IN, generator=g)).to(DEVICE, dtype).requires_grad_()
    fwd, bwd = torch.ops.fastpeft.ia3_linear_fwd.default, torch.ops.fastpeft.ia3_linear_bwd.default
    dy = _rnd(*M_LEAD, D_OUT, dtype=dtype, g=g)
    return [(fwd, (x, w, bias, l_out, "output", backend)),
            (fwd, (x, w, None, l_in, "input", backend)),
            (bwd, (dy, x.detach(), w, bias, l_out.detach(), "output", True, True, backend)),
            (bwd, (dy, x.detach(), w, None, l_in.detach(), "input", False, True, backend))]


def _multi_lora_cases(backend, dtype, g):
    ranks, offsets, max_rank = [3, 0, 5], [0, 3, 3], 5  # an empty slot, ranks that differ
    x = _x(dtype, g)
    w = _rnd(D_OUT, D_IN, dtype=dtype, g=g, scale=D_IN ** -0.5)
    a = _rnd(8, D_IN, dtype=dtype, g=g, scale=D_IN ** -0.5, grad=True)
    b = _rnd(8, D_OUT, dtype=dtype, g=g, scale=0.4).t().requires_grad_()  # a transposed pool
    bias = _rnd(D_OUT, dtype=dtype, g=g)
    seq_ids = torch.tensor([2, -1, 0], dtype=torch.int16)  # per sequence, on the CPU
    ids = seq_ids.to(DEVICE)[:, None].expand(3, 5).reshape(15)
    ranks_t = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    offsets_t = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    scal = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    ops = torch.ops.fastpeft
    check, fwd, bwd = (ops.multi_lora_check_ids.default, ops.multi_lora_linear_fwd.default,
                       ops.multi_lora_linear_bwd.default)
    table = (ranks_t, offsets_t, scal, max_rank)
    _, s = fwd(x.detach(), w, a.detach(), b.detach(), bias, ids, *table, False, True, backend)
    dy = _rnd(*M_LEAD, D_OUT, dtype=dtype, g=g)
    return [(check, (seq_ids, 3, torch.tensor([True, False, True], device=DEVICE), torch.device(DEVICE))),
            (check, (torch.tensor([[1, 0, 2, 2, 1]] * 3, dtype=torch.uint32), 3, None, torch.device(DEVICE))),
            (fwd, (x, w, a, b, bias, ids, *table, False, True, backend)),
            (fwd, (x, w, a, b, None, ids, *table, True, False, backend)),
            (bwd, (dy, x.detach(), w, a.detach(), b.detach(), s, ids, *table, False, True, True, True, backend)),
            (bwd, (dy, x.detach(), w, a.detach(), b.detach(), s, ids, *table, True, False, True, False, backend))]


def _galore_cases(backend, dtype, g):
    layer = galore.enable(torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT)), ["0"], rank=4, projector="svd",
                          backend=backend)[0].to(DEVICE, dtype)
    ref = galore_linear_custom_op.GaLoreStateRef(layer.galore)
    x = _x(dtype, g)
    w, bias = layer.weight.detach(), layer.bias.detach().requires_grad_()
    fwd, bwd = torch.ops.fastpeft.galore_linear_fwd.default, torch.ops.fastpeft.galore_linear_bwd.default
    dy = _rnd(*M_LEAD, D_OUT, dtype=dtype, g=g)
    low = torch.bfloat16 if dtype == torch.float32 else None  # autocast's dtype, passed by the traced caller
    return [(fwd, (x, w, bias, ref, None)), (fwd, (x, w, None, ref, low)),
            (bwd, (dy, x.detach(), w, ref, True, True, True)), (bwd, (dy, x.detach(), w, ref, False, False, True))]


CASES = {"lora_linear": _lora_cases, "bottleneck_adapter": _adapter_cases, "ia3_linear": _ia3_cases,
         "multi_lora_linear": _multi_lora_cases, "galore_linear": _galore_cases}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op_passes_opcheck(op, backend, dtype):
    if op == "galore_linear" and not galore_linear_custom_op.SUPPORTED:
        pytest.skip(galore_linear_custom_op.UNSUPPORTED_REASON)
    # torch's SchemaCheckMode cannot turn an opaque object with attributes (GaLore's state handle) into an
    # IValue, so test_schema cannot run on the GaLore ops; their only side effect, on that state, is
    # declared as an ordered effect instead (galore_linear_custom_op.py)
    utils = [u for u in DEFAULT_UTILS if not (op == "galore_linear" and u == "test_schema")]
    g = torch.Generator().manual_seed(0)
    for overload, args in CASES[op](backend, dtype, g):
        torch.library.opcheck(overload, args, test_utils=utils)


def test_import_fastpeft_registers_every_op():
    """A compiled graph reaches the ops through torch.ops.fastpeft: `import fastpeft` alone must register them
    (fastpeft/__init__.py imports every *_custom_op module). A fresh interpreter, so no test import helps."""
    ops = ["lora_linear_fwd", "lora_linear_bwd", "bottleneck_adapter_fwd", "bottleneck_adapter_bwd",
           "ia3_linear_fwd", "ia3_linear_bwd", "multi_lora_check_ids", "multi_lora_linear_fwd", "multi_lora_linear_bwd"]
    ops += ["galore_linear_fwd", "galore_linear_bwd"] if galore_linear_custom_op.SUPPORTED else []
    code = ("import torch, fastpeft\n"
            f"missing = [n for n in {ops!r} if not hasattr(torch.ops.fastpeft, n)]\n"
            "assert not missing, f'not registered by import fastpeft: {missing}'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("op", ["lora_linear", "ia3_linear", "multi_lora_linear", "galore_linear"])
def test_cublas_op_passes_opcheck(op):
    """The ops with a cuBLAS path, through it (fp32: the custom ops' plumbing, not rounding, is under test)."""
    test_op_passes_opcheck(op, "cublas", torch.float32)
