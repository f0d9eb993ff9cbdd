"""fastpeft.qlora_linear: LoRA over a bitsandbytes 4-bit (NF4 / FP4) frozen base, fused.

    y = x·deq(W0)ᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ

W0 stays packed: the Triton GEMM (kernels/qlora_linear.py) dequantizes each W0 tile as it loads it (codes and
absmax read once per tile, never a full-precision W0 in memory), forward and dX backward, with the LoRA term in
its accumulator; S, dS/dB/dbias and dA come from the LoRA kernels (kernels/lora_linear.py), with LoRA's dropout
stream. The PyTorch backend (ops/qlora_linear_torch.py) walks W0 in row blocks through bitsandbytes' dequantize.
Rounding follows bitsandbytes + PEFT: forward dequantizes straight to x's dtype, backward through the dtype W0 was
quantized from. bitsandbytes is an optional extra: it is never imported here, its QuantState is read by attribute.

Eager calls run QLoRALinearFunction; under torch.compile, qlora_linear_traced calls torch.ops.fastpeft.qlora_linear_fwd
(qlora_linear_custom_op.py, which imports this module, never the reverse).
"""
from __future__ import annotations

import torch

from .._backend import requested_backend, resolve_backend
from .._checks import FLOAT_DTYPES, check_finite_number, check_finite_number_traceable, check_probability, check_tensor
from ..dropout import SEED_BOUND, draw_seed, keep_threshold
from ..limits import LORA_MAX_RANK_TRITON as MAX_TRITON_RANK
from .qlora_linear_torch import Quant4, qlora_linear_bwd_torch, qlora_linear_fwd_torch
from .shapes import as_rows

QUANT_TYPES = ("nf4", "fp4")


def _triton_impl():
    from ..kernels import qlora_linear as k

    return k.qlora_linear_fwd, k.qlora_linear_bwd


def resolve_qlora_backend(backend: str | None, device: torch.device, r: int) -> str:
    """'torch' or 'triton' ('auto': torch on the CPU, triton on CUDA where it can run)."""
    reason = None if r <= MAX_TRITON_RANK else f"r={r} exceeds the kernels' maximum rank {MAX_TRITON_RANK}"
    return resolve_backend(backend, device, triton_ok=reason, op="qlora_linear")


def _impl(backend: str):
    if backend == "triton":
        return _triton_impl()
    return qlora_linear_fwd_torch, qlora_linear_bwd_torch


def quant4(weight: torch.Tensor, quant_state) -> Quant4:
    """A Quant4 from bitsandbytes' packed weight (Params4bit or its data, any quant_storage dtype) and its
    QuantState (read by attribute: absmax, code, blocksize, shape, dtype, quant_type, offset, state2).
    Raises ValueError / TypeError naming what is unsupported or inconsistent."""
    if quant_state is None:
        raise ValueError("quant_state: expected bitsandbytes' QuantState of the 4-bit weight, got None "
                         "(a Params4bit not yet quantized: move the module to its device first)")
    qt = getattr(quant_state, "quant_type", None)
    if qt not in QUANT_TYPES:
        raise ValueError(f"quant_state.quant_type: expected one of {QUANT_TYPES} (bitsandbytes' 4-bit types), got {qt!r}")
    check_tensor("weight", weight)
    shape = tuple(int(d) for d in quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"quant_state.shape: expected the 2-D [out_features, in_features], got {shape}")
    n, k = shape
    packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    if packed.dtype != torch.uint8:
        if packed.dtype.is_floating_point or packed.dtype.itemsize > 1:
            packed = packed.contiguous().view(torch.uint8)  # quant_storage other than uint8: the same bytes
        else:
            raise TypeError(f"weight: expected the packed 4-bit codes (uint8 or a quant_storage dtype), got {packed.dtype}")
    packed = packed.reshape(-1)
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"weight: expected {(n * k + 1) // 2} packed bytes for a [{n}, {k}] 4-bit weight, "
                         f"got {packed.numel()}")
    bs = int(quant_state.blocksize)
    if bs < 2 or bs & (bs - 1):
        raise ValueError(f"quant_state.blocksize: expected a power of two >= 2, got {bs}")
    blocks = -(-n * k // bs)
    absmax, code = quant_state.absmax, quant_state.code
    if code is None or code.numel() != 16 or not code.dtype.is_floating_point:
        raise ValueError(f"quant_state.code: expected the 16-entry float code table, got "
                         f"{None if code is None else (tuple(code.shape), code.dtype)}")
    absmax = absmax.reshape(-1)
    if absmax.numel() != blocks:
        raise ValueError(f"quant_state.absmax: expected {blocks} block scales ({n}·{k} elements / blocksize {bs}), "
                         f"got {absmax.numel()}")
    state2 = getattr(quant_state, "state2", None)
    nested = bool(getattr(quant_state, "nested", False)) and state2 is not None
    absmax2 = code2 = offset = None
    bs2 = 0
    if nested:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"quant_state.absmax: expected uint8 codes with double quantization, got {absmax.dtype}")
        bs2 = int(state2.blocksize)
        absmax2, code2 = state2.absmax.reshape(-1).float(), state2.code.reshape(-1).float()
        if code2.numel() != 256 or absmax2.numel() != -(-blocks // bs2):
            raise ValueError(f"quant_state.state2: expected a 256-entry code and {-(-blocks // bs2)} nested scales, "
                             f"got {code2.numel()} and {absmax2.numel()}")
        offset = quant_state.offset
        offset = torch.as_tensor(offset, dtype=torch.float32, device=absmax.device).reshape(())
    elif not absmax.dtype.is_floating_point:
        raise TypeError(f"quant_state.absmax: expected float block scales (no double quantization), got {absmax.dtype}")
    elif absmax.dtype != torch.float32:
        absmax = absmax.float()
    dtype = getattr(quant_state, "dtype", None)
    dtype = dtype if dtype in FLOAT_DTYPES else torch.float32
    return Quant4(packed, absmax, code.reshape(-1).float(), absmax2, code2, offset, n, k, bs, bs2, qt, dtype)


def check_qlora_inputs(x, q: Quant4, lora_a, lora_b, bias, scaling, dropout_p) -> tuple[float, float]:
    """The tensors of a QLoRA linear (x [..., in] in a compute dtype the kernels serve; lora_a [r, in],
    lora_b [out, r]; bias [out] in x's dtype) against the 4-bit weight; returns (scaling, dropout_p)."""
    check_tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: the compute dtype must be one of {[str(d) for d in FLOAT_DTYPES]} (what the QLoRA kernels "
                        f"serve), got {x.dtype}")
    if bias is not None:
        check_tensor("bias", bias)
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias: a quantized bias ({bias.dtype}) is not supported; bitsandbytes keeps Linear4bit's "
                            f"bias in floating point, pass it in x's dtype ({x.dtype})")
    check_tensor("lora_a", lora_a, 2)
    check_tensor("lora_b", lora_b, 2)
    n, k, r = q.out_features, q.in_features, lora_a.shape[0]
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension {k} (the 4-bit weight is [out, in] = [{n}, {k}]), "
                         f"got shape {tuple(x.shape)}")
    if r < 1 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a: expected shape [r, {k}] with r >= 1, got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b: expected shape [{n}, {r}] ([out_features, r]), got {tuple(lora_b.shape)}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_b: expected dtype {lora_a.dtype} (the dtype of lora_a), got {lora_b.dtype}")
    if lora_a.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_a: expected dtype {x.dtype} (the dtype of x) or torch.float32, got {lora_a.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias), ("weight", q.packed),
                    ("quant_state.absmax", q.absmax)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    return check_finite_number("scaling", scaling), check_probability("dropout_p", dropout_p)


def _forward(x2, q, lora_a, lora_b, bias, scaling, dropout_p, seed, backend):
    fwd, _ = _impl(backend)
    thr = keep_threshold(dropout_p)
    m, n = x2.shape[0], q.out_features
    if m == 0 or n == 0:
        return x2.new_zeros((m, n)) + (bias if bias is not None else 0), x2.new_zeros((m, lora_a.shape[0])), thr
    y2, s = fwd(x2, q, lora_a, lora_b, bias, scaling, dropout_p, seed, thr)
    return y2, s, thr


class QLoRALinearFunction(torch.autograd.Function):
    """Autograd Function of the fused QLoRA linear on rows (use fastpeft.qlora_linear). W0 is frozen: no gradient."""

    @staticmethod
    def forward(ctx, x, q, lora_a, lora_b, bias, scaling, dropout_p, seed, backend):
        y2, s, thr = _forward(as_rows(x), q, lora_a, lora_b, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, lora_a, lora_b, s)
        ctx.q, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.thr, ctx.backend = q, scaling, dropout_p, seed, thr, backend
        ctx.has_bias = bias is not None
        return y2

    @staticmethod
    def backward(ctx, dy2):
        x, lora_a, lora_b, s = ctx.saved_tensors
        need_dx, _, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        needs = (need_dx, need_da, need_db, need_dbias and ctx.has_bias)
        x2 = as_rows(x)
        dx = da = db = dbias = None
        if any(needs):
            if x2.shape[0] == 0:
                dx = torch.zeros_like(x2) if needs[0] else None
                da = torch.zeros_like(lora_a) if needs[1] else None
                db = torch.zeros_like(lora_b) if needs[2] else None
                dbias = dy2.new_zeros(ctx.q.out_features) if needs[3] else None
            elif torch.is_grad_enabled():  # create_graph=True: the twin's out-of-place, differentiable formulas
                if needs[2]:
                    from .qlora_linear_torch import qlora_shrink_torch
                    s = qlora_shrink_torch(x2, lora_a, ctx.dropout_p, ctx.seed)
                dx, da, db, dbias = qlora_linear_bwd_torch(dy2, x2, ctx.q, lora_a, lora_b, s, ctx.scaling,
                                                           ctx.dropout_p, ctx.seed, ctx.thr, needs)
            else:
                _, bwd = _impl(ctx.backend)
                dx, da, db, dbias = bwd(dy2, x2, ctx.q, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, ctx.seed,
                                        ctx.thr, needs)
        if dx is not None:
            dx = dx.view(x.shape)
        return dx, None, da, db, dbias, None, None, None, None


def _unrows(y2, x):
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], y2.shape[1])


def _seed(seed, p, device):
    if p <= 0:
        return 0
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_BOUND:
        raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}] or None, got {seed!r}")
    return seed


def qlora_linear(x, weight, quant_state, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, training=True, *,
                 seed=None, backend=None):
    """LoRA over a bitsandbytes 4-bit base: y = x·deq(W0)ᵀ + bias + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ.

    weight: bitsandbytes' packed 4-bit weight (Linear4bit.weight, a Params4bit, or its data); quant_state: its
    QuantState (weight.quant_state): NF4 or FP4, any blocksize, with or without double quantization. x [..., in]
    in the compute dtype (fp32, fp16 or bf16); lora_a [r, in], lora_b [out, r] in x's dtype or fp32; bias [out]
    in x's dtype. Same outputs and gradients as PEFT's lora.bnb.Linear4bit; W0 gets no gradient.
    backend: "auto" (default, or $FASTPEFT_BACKEND), "triton" or "torch".
    """
    if torch.compiler.is_compiling():
        return qlora_linear_traced(x, weight, quant_state, lora_a, lora_b, scaling, bias, dropout_p, training,
                                   seed=seed, backend=backend)
    q = weight if isinstance(weight, Quant4) else quant4(weight, quant_state)
    scaling, dropout_p = check_qlora_inputs(x, q, lora_a, lora_b, bias, scaling, dropout_p)
    return qlora_linear_q4(x, q, lora_a, lora_b, scaling, bias, dropout_p if training else 0.0, seed=seed,
                           backend=backend)


def qlora_linear_q4(x, q: Quant4, lora_a, lora_b, scaling: float, bias, p: float, *, seed=None, backend=None):
    """qlora_linear on an already validated Quant4 and arguments (the module's cached hot path)."""
    name = resolve_qlora_backend(backend, x.device, lora_a.shape[0])
    seed = _seed(seed, p, x.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_a, lora_b, bias)):
        y2 = QLoRALinearFunction.apply(x, q, lora_a, lora_b, bias, scaling, p, seed, name)
    else:
        y2 = _forward(as_rows(x), q, lora_a, lora_b, bias, scaling, p, seed, name)[0]
    return _unrows(y2, x)


def qlora_linear_traced(x, weight, quant_state, lora_a, lora_b, scaling, bias=None, dropout_p=0.0, training=True, *,
                        seed=None, backend=None):
    """qlora_linear through the torch.library op fastpeft::qlora_linear_fwd (what a compiled graph calls); the
    seed travels as a 0-d int64 tensor on x's device, as in lora_linear_traced."""
    check_finite_number_traceable("scaling", scaling)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    q = weight if isinstance(weight, Quant4) else quant4(weight, quant_state)
    check_qlora_inputs(x, q, lora_a, lora_b, bias, 1.0, 0.0)
    if backend is not None:
        requested_backend(backend)
    p = dropout_p if training else 0.0
    if p == 0:
        seed_t = None
    elif seed is None:
        seed_t = torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=x.device)
    elif isinstance(seed, torch.Tensor):
        seed_t = seed
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_BOUND:
            raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}], a 0-d int64 tensor or None, got {seed!r}")
        seed_t = torch.full((), seed, dtype=torch.int64, device=x.device)
    y2, _ = torch.ops.fastpeft.qlora_linear_fwd(
        x, q.packed, q.absmax, q.code, q.absmax2, q.code2, q.offset, lora_a, lora_b, bias, scaling, p, seed_t,
        q.out_features, q.blocksize, q.blocksize2, q.quant_type, q.dtype, backend or "")
    return _unrows(y2, x)


__all__ = ["qlora_linear", "qlora_linear_q4", "qlora_linear_traced", "QLoRALinearFunction", "quant4",
           "check_qlora_inputs", "resolve_qlora_backend", "Quant4", "QUANT_TYPES"]
