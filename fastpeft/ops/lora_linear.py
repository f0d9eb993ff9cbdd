"""fastpeft.lora_linear: y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with fused kernels, in PEFT's layout.

Backends: "triton" (kernels/lora_linear.py), "cuda" (lora_linear_cuda.py) and "torch" (lora_linear_torch.py),
the same decomposition; see fastpeft._backend for how one is chosen. Dropout is drawn from a seed
(fastpeft.dropout), so backward regenerates the mask instead of storing it: saved for backward are x itself,
S = dropout(x)·Aᵀ and the seed.

dropout_mask="packed" (torch, triton, cublas and auto's choice among them; not cuda) stores the mask instead: the
forward's shrink writes it as bits, [M, ceil(in/8)] uint8, saved for backward, where the dX GEMM and the dA
kernel read it. Tradeoff per step: M·in/8 bytes written once and read twice (12 MiB at M = 8192, in = 4096,
about 3 µs of an H200's ~4 TB/s) and held from forward to backward (4 MiB per layer there), against two Philox
regenerations of the [M, in] mask (Philox4x32-10, ~15 integer instructions per element: ~19 µs each at that
shape on an H200, partly hidden under the kernels' memory and tensor-core time; benchmarks/bench_dropout.py
measures both). Same seed, same mask bits, same results.

Eager calls run LoRALinearFunction. Under torch.compile, lora_linear_traced calls the torch.library ops
torch.ops.fastpeft.lora_linear_fwd/bwd, which lora_linear_custom_op.py registers (importing this module, never
imported by it; fastpeft/__init__.py imports both).
"""
from __future__ import annotations

import torch

from .._backend import requested_backend, resolve_backend
from .._checks import (
    FLOAT_DTYPES, check_finite_number, check_finite_number_traceable, check_float_dtype, check_probability,
    check_same_device, check_tensor,
)
from ..dropout import SEED_BOUND, check_dropout_mask, draw_seed, keep_threshold, packed_mask_shape, traced_seed
from .. import _ext_cpu
from .lora_linear_backends import launchers
from .lora_linear_torch import lora_linear_bwd_torch, lora_shrink_torch
from .shapes import as_rows

from ..limits import LORA_MAX_RANK_CUDA
from ..limits import LORA_MAX_RANK_TRITON as MAX_TRITON_RANK  # the one limit: fastpeft/limits.py


def resolve_lora_backend(backend: str | None, device: torch.device, r: int) -> str:
    """The backend that runs a LoRA linear of rank r on `device` (see fastpeft._backend.resolve_backend):
    'torch', 'triton', 'cuda', 'cublas', or for auto on a CUDA device 'measured' (each pass dispatched by shape
    to the backend measured fastest: ops/lora_linear_auto.py; `_impl` takes the name like the others)."""
    triton_reason = None if r <= MAX_TRITON_RANK else f"r={r} exceeds the kernels' maximum rank {MAX_TRITON_RANK}"
    cuda_reason = None if r <= LORA_MAX_RANK_CUDA else f"r={r} exceeds the CUDA kernels' maximum rank {LORA_MAX_RANK_CUDA}"
    return resolve_backend(backend, device, triton_ok=triton_reason, cuda_ok=cuda_reason, op="lora_linear",
                           cublas_ok=triton_reason, measured=True)


# backends that take dropout_mask="packed" ("measured": auto on CUDA, which then never picks cuda)
PACKED_MASK_BACKENDS = ("torch", "triton", "cublas", "measured")


def check_mask_backend(dropout_mask: str, backend: str) -> None:
    """Refuse dropout_mask="packed" on a backend without it (cuda), before any work."""
    if dropout_mask == "packed" and backend not in PACKED_MASK_BACKENDS:
        raise NotImplementedError(
            f"dropout_mask='packed' is not supported by the {backend!r} backend (it regenerates the mask in its "
            f"own kernels); use dropout_mask='regenerate', or backend 'triton', 'cublas', 'torch' or 'auto'")


def _impl(backend: str):
    if backend == "measured":
        from .lora_linear_auto import lora_linear_bwd_measured, lora_linear_fwd_measured

        return lora_linear_fwd_measured, lora_linear_bwd_measured
    return launchers(backend)


def cpu_autograd_node(backend: str, device: torch.device):
    """fastpeft._C_cpu.lora_apply where it serves this call: the torch backend on the CPU with the extension built.
    It is LoRALinearFunction's forward and backward as one C++ autograd node (the same ops, the same bits; double
    backward through differentiable ops), so a training step runs no Python in the layer's backward."""
    if backend != "torch" or device.type != "cpu" or _distributed():
        return None
    return getattr(_ext_cpu.get(), "lora_apply", None)


def _distributed() -> bool:
    # Inside a torch.distributed process group the Python Function runs instead: 2-rank FSDP2 runs on gloo with the
    # node aborted at process exit ("terminate called without an active exception") about 1 run in 15, after all
    # their work was done and checked; without the node, 0 in 26. Not understood yet.
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _unrows(y2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y [M, out] back to x's leading shape, outside any autograd Function (so y may be modified in place)."""
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], y2.shape[1])


def _forward(x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend, packed=False):
    """(y [M, out], S [M, r], the dropout threshold, the packed keep bits or None) on rows x2 [M, in] from the
    backend's forward launcher; packed (dropout_mask="packed", with dropout): the launcher fills the bits."""
    fwd, _ = _impl(backend)
    thr = keep_threshold(dropout_p)
    m, n = x2.shape[0], weight.shape[0]
    if m == 0 or n == 0:  # nothing to compute; no kernel is launched on an empty grid
        return x2.new_empty((m, n)), x2.new_zeros((m, lora_a.shape[0])), thr, None
    if packed and dropout_p > 0:
        mask = torch.empty(packed_mask_shape(m, x2.shape[1]), dtype=torch.uint8, device=x2.device)
        y2, s = fwd(x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, thr, mask=mask)
        return y2, s, thr, mask
    y2, s = fwd(x2, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, thr)
    return y2, s, thr, None


def _differentiable_backward(dy2, x2, weight, lora_a, lora_b, scaling, p, seed, needs):
    """Backward under create_graph=True: the gradient formulas in differentiable torch ops, S recomputed from
    x and A (the forward's S carries no graph), so second derivatives are exact whichever backend ran forward
    (same dropout stream). Slower than the kernels; only double backward takes it."""
    need_dx, need_da, need_db, need_dbias = needs
    s = lora_shrink_torch(x2, lora_a, p, seed) if need_db else None
    return lora_linear_bwd_torch(dy2, x2, weight, lora_a, lora_b, s, scaling, p, seed, keep_threshold(p), needs)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the fused LoRA linear, on rows: x [..., in] -> y [M, out], M = x.numel() // in.

    Use fastpeft.lora_linear, which validates inputs and restores x's leading shape outside the Function: an
    output viewed inside a custom Function could not be modified in place (relu_(), +=) in training.
    Double backward (create_graph=True) is supported on every backend, through differentiable torch ops.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend, packed=False):
        y2, s, thr, mask = _forward(as_rows(x), weight, lora_a, lora_b, bias, scaling, dropout_p, seed, backend,
                                    packed)
        ctx.save_for_backward(x, weight, lora_a, lora_b, s, mask)  # mask: None unless dropout_mask="packed"
        # seed: an int, or a 0-d device tensor (draw_seed under CUDA graph capture), kept as it is: backward reads
        # the tensor's memory, which a replay's forward has refilled with that replay's seed
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.thr, ctx.backend = scaling, dropout_p, seed, thr, backend
        ctx.has_bias = bias is not None
        return y2

    @staticmethod
    def backward(ctx, dy2):
        x, weight, lora_a, lora_b, s, mask = ctx.saved_tensors
        need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        need_dbias = need_dbias and ctx.has_bias
        needs = (need_dx, need_da, need_db, need_dbias)
        x2 = as_rows(x)
        dx = dw = da = db = dbias = None
        if torch.is_grad_enabled():  # create_graph=True: a graph of the backward itself is wanted
            if any(needs):
                dx, da, db, dbias = _differentiable_backward(dy2, x2, weight, lora_a, lora_b, ctx.scaling,
                                                             ctx.dropout_p, ctx.seed, needs)
        elif x2.shape[0] == 0 or weight.shape[0] == 0:  # empty: no kernel launch
            dx = torch.zeros_like(x2) if need_dx else None
            da = torch.zeros_like(lora_a) if need_da else None
            db = torch.zeros_like(lora_b) if need_db else None
            dbias = weight.new_zeros(weight.shape[0]) if need_dbias else None
        elif any(needs):
            _, bwd = _impl(ctx.backend)
            args = (dy2, x2, weight, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.thr, needs)
            dx, da, db, dbias = bwd(*args) if mask is None else bwd(*args, mask=mask)
        if dx is not None:
            dx = dx.view(x.shape)
        if need_dw:  # W0 is frozen in LoRA; a caller who trains it anyway gets its exact gradient
            dw = (dy2.t() @ x2).to(weight.dtype)
        return dx, dw, da, db, dbias, None, None, None, None, None


def check_lora_tensors(x, weight, lora_a, lora_b, bias, *, noun: str = "shape", rank: str = "r") -> None:
    """Shapes, devices and dtypes of a LoRA linear's tensors (lora_a [rank, in], lora_b [out, rank]);
    `noun` and `rank` name lora_a's layout in the messages (a multi-adapter pool passes its own)."""
    if _all_valid(x, weight, lora_a, lora_b, bias):  # the common case in one expression; the checks below name
        return                                        # what is wrong otherwise
    check_tensor("x", x)
    check_tensor("weight", weight, 2)
    check_tensor("lora_a", lora_a, 2)
    check_tensor("lora_b", lora_b, 2)
    if bias is not None:
        check_tensor("bias", bias, 1)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape [..., in_features], got a 0-D tensor")
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected last dimension {in_f} (weight is [out, in] = {list(weight.shape)}), got shape {tuple(x.shape)}")
    if in_f == 0:
        raise ValueError(f"x: expected in_features >= 1 (the last dimension of x and of weight [out, in]), "
                         f"got x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)}")
    if r < 1 or lora_a.shape[1] != in_f:
        raise ValueError(f"lora_a: expected {noun} [{rank}, {in_f}] with {rank} >= 1 and {in_f} the in_features of weight, "
                         f"got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"lora_b: expected {noun} [{out_f}, {r}] ([out_features, {rank}]), got {tuple(lora_b.shape)}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"bias: expected shape [{out_f}], got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    check_float_dtype("x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_b: expected dtype {lora_a.dtype} (the dtype of lora_a), got {lora_b.dtype}")
    if lora_a.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_a: expected dtype {x.dtype} (the dtype of x) or torch.float32, got {lora_a.dtype}")


_Tensor = torch.Tensor


def _all_valid(x, weight, lora_a, lora_b, bias) -> bool:
    """Whether check_lora_tensors would pass, cheaply (it runs on every functional call)."""
    if not (isinstance(x, _Tensor) and isinstance(weight, _Tensor) and isinstance(lora_a, _Tensor)
            and isinstance(lora_b, _Tensor) and (bias is None or isinstance(bias, _Tensor))):
        return False
    ws, a_s, b_s, xdt, adt = weight.shape, lora_a.shape, lora_b.shape, x.dtype, lora_a.dtype
    if not (len(ws) == 2 and len(a_s) == 2 and len(b_s) == 2 and x.dim() >= 1 and ws[1] != 0
            and x.shape[-1] == ws[1] and a_s[0] >= 1 and a_s[1] == ws[1] and b_s[0] == ws[0] and b_s[1] == a_s[0]):
        return False
    if not (xdt in FLOAT_DTYPES and weight.dtype == xdt and lora_b.dtype == adt
            and (adt == xdt or adt == torch.float32)):
        return False
    dev = x.device
    if not (weight.device == dev and lora_a.device == dev and lora_b.device == dev):
        return False
    return bias is None or (bias.dim() == 1 and bias.shape[0] == ws[0] and bias.dtype == xdt and bias.device == dev)


def check_lora_inputs(x, weight, lora_a, lora_b, bias, scaling, dropout_p) -> tuple[float, float]:
    """Validate the arguments of lora_linear; returns (scaling, dropout_p) as floats."""
    check_lora_tensors(x, weight, lora_a, lora_b, bias)
    return check_finite_number("scaling", scaling), check_probability("dropout_p", dropout_p)


def lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, training=True, *, seed=None, backend=None,
                dropout_mask="regenerate"):
    """LoRA linear in HF PEFT's layout: y = x·Wᵀ + bias + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ.

    x [..., in] (fp32, fp16 or bf16); weight [out, in] and bias [out] in x's dtype; lora_a [r, in] and
    lora_b [out, r] in x's dtype or fp32. Every tensor may have any strides (sliced, transposed, expanded,
    overlapping views); in_features >= 1, r >= 1, any M and out_features (0 included). The result is a fresh
    tensor (for x of other than 2 dims, a view of one made outside the autograd Function), so in-place ops
    on it train; double backward works on every backend. Dropout applies only when `training`; its mask
    comes from `seed` (drawn from torch's CPU generator when None) and, by default, is never stored.
    backend: "auto" (default, or $FASTPEFT_BACKEND), "triton", "cuda", "cublas" or "torch" (see fastpeft._backend).
    dropout_mask: "regenerate" (default: the backward recomputes the mask from the seed) or "packed" (the forward
    stores it as bits, [M, ceil(in/8)] uint8, for the backward; not on the cuda backend): the same results.
    """
    if torch.compiler.is_compiling():  # traced: the torch.library ops, no graph break
        return lora_linear_traced(x, weight, lora_a, lora_b, scaling, bias, dropout_p, training, seed=seed, backend=backend,
                                  dropout_mask=dropout_mask)
    scaling, dropout_p = check_lora_inputs(x, weight, lora_a, lora_b, bias, scaling, dropout_p)
    packed = check_dropout_mask(dropout_mask) == "packed"
    name = resolve_lora_backend(backend, x.device, lora_a.shape[0])
    check_mask_backend(dropout_mask, name)
    p = dropout_p if training else 0.0
    if p > 0:
        if seed is None:  # an int; a device tensor while a CUDA graph is captured, so each replay gets a fresh mask
            seed = draw_seed(x.device)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_BOUND:
            raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}] or None, got {seed!r}")
    else:
        seed = 0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, bias)):
        # the C++ node keeps no mask: a packed one takes the Function
        node = cpu_autograd_node(name, x.device) if type(seed) is int and type(x) is torch.Tensor else None
        if node is not None and not (packed and p > 0):
            y2 = node(x, weight, lora_a, lora_b, bias, scaling, p, seed, keep_threshold(p) if p > 0 else 0)
        else:
            y2 = LoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, scaling, p, seed, name, packed)
    else:  # inference (decode): the same kernels without autograd's bookkeeping, which costs more than a small GEMV
        y2 = _forward(as_rows(x), weight, lora_a, lora_b, bias, scaling, p, seed, name)[0]
    return _unrows(y2, x)


def _check_scalars(scaling, dropout_p):
    """check_lora_inputs' scalar checks in a form Dynamo traces: after a recompile a float argument may be
    symbolic, and math.isfinite() of a symbolic float is a graph break; comparisons are not (they guard)."""
    check_finite_number_traceable("scaling", scaling)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    return scaling, dropout_p


def lora_linear_traced(x, weight, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, training=True, *,
                       seed=None, backend=None, dropout_mask="regenerate"):
    """fastpeft.lora_linear through the torch.library ops (lora_linear_custom_op.py): what a compiled graph calls.

    Same arguments and checks as fastpeft.lora_linear; `seed` may also be a 0-d torch.int64 tensor, on the CPU
    or on x's device.

    The seed. A compiled graph cannot turn a tensor into a Python int without a graph break (.item()), and a
    Python int baked into the graph would repeat one dropout mask every step. So the seed travels as a 0-d
    int64 tensor on x's device: drawn inside the graph by torch.randint when the caller passes none (fresh on
    every call; on CUDA from CUDA's generator, which a CUDA graph replays with a fresh value, so
    mode="reduce-overhead" captures the layer and each replay gets its own mask), and read on the device by
    the kernels and the PyTorch twin, never on the host. A graph on CUDA tensors thus holds no CPU op, which
    would make Inductor skip CUDA graphs. An int seed becomes a tensor on x's device. A CPU tensor seed for
    CUDA x is read on the host by the ops (CPU memory: no GPU sync), so a graph holding one is not captured.
    Without dropout no seed enters the graph at all.
    """
    scaling, dropout_p = _check_scalars(scaling, dropout_p)
    check_lora_inputs(x, weight, lora_a, lora_b, bias, 1.0, 0.0)  # the tensor checks
    if backend is not None:
        requested_backend(backend)  # a bad name fails while tracing, not at the first run
    check_dropout_mask(dropout_mask)
    p = dropout_p if training else 0.0
    seed_t = traced_seed(seed, p, x.device)
    y2 = torch.ops.fastpeft.lora_linear_fwd(x, weight, lora_a, lora_b, bias, scaling, p, seed_t, backend or "",
                                            dropout_mask)[0]
    return _unrows(y2, x)


__all__ = ["lora_linear", "LoRALinearFunction", "cpu_autograd_node", "check_mask_backend", "lora_linear_traced", "resolve_lora_backend", "check_lora_inputs",
           "check_lora_tensors", "FLOAT_DTYPES"]
