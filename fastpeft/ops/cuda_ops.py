"""The CUDA kernels of csrc/ as PyTorch custom ops (namespace "fastpeft", names cuda_*).

Each op has a fake implementation, so it traces under torch.compile without running; the extension is
loaded (or built just in time, see fastpeft._ext) on the first real call. Inputs are validated in C++
(csrc/bindings.cpp) before any launch; the fakes check the same shapes so that errors surface at trace
time too. These are building blocks without autograd: the LoRA op's backend="cuda" path composes them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext

__all__ = ["lora_shrink_cuda", "lora_expand_cuda", "lora_dy_reduce_cuda", "lora_bwd_da_cuda", "rank_update_cuda_",
           "lora_decode_cuda"]

from ..limits import LORA_MAX_RANK_CUDA as MAX_RANK  # csrc/fastpeft_cuda.h kMaxRank; fastpeft/limits.py
MAX_DECODE_ROWS = 16
MAX_EXPAND_COLS = 65535 * 128  # csrc/bindings.cpp kMaxExpandCols: the expand grid's 128-column blocks in grid.y
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _stream(t: Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device, as an integer."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return int(raw(index)) if raw is not None else int(torch.cuda.current_stream(t.device).cuda_stream)


def _require_cuda(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"{name}: expected a CUDA tensor, got device {t.device}")


def _check_2d(name: str, t: Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _check_dim(name: str, t: Tensor, dim: int, expected: int, why: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}: expected size {expected} in dim {dim} ({why}), got shape {tuple(t.shape)}")


def _check_rank(what: str, r: int) -> None:
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{what}: expected a rank in [1, {MAX_RANK}], got {r}")


def _check_dropout(p: float, seed: int) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a dropout probability in [0, 1), got {p}")
    if not 0 <= seed <= 2**31 - 1:
        raise ValueError(f"seed: expected an int in [0, {2**31 - 1}], got {seed}")


def _check_bias(bias: Tensor | None, n: int, ref: Tensor, ref_name: str) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias: expected shape [{n}], got {tuple(bias.shape)}")
    if bias.dtype != ref.dtype:
        raise TypeError(f"bias: expected dtype {ref.dtype} (that of {ref_name}), got {bias.dtype}")


# --- lora_shrink ---------------------------------------------------------------------------------------
def _shrink_shapes(x: Tensor, a: Tensor, p: float, seed: int) -> None:
    _check_2d("x", x)
    _check_2d("a", a, x.dtype)
    _check_dim("a", a, 1, x.shape[1], "a is [r, in] with in = x.shape[1]")
    _check_rank("a.shape[0]", a.shape[0])
    _check_dropout(p, seed)


@torch.library.custom_op("fastpeft::cuda_lora_shrink", mutates_args=())
def _lora_shrink(x: Tensor, a: Tensor, p: float, seed: int) -> Tensor:
    _require_cuda(x=x, a=a)
    return _ext.load_extension().lora_shrink(x, a, p, seed, _stream(x))


@_lora_shrink.register_fake
def _(x, a, p, seed):
    _shrink_shapes(x, a, p, seed)
    return x.new_empty((x.shape[0], a.shape[0]))


def lora_shrink_cuda(x: Tensor, a: Tensor, p: float = 0.0, seed: int = 0) -> Tensor:
    """S = dropout(x) @ a.T in x's dtype; x [M, in], a [r, in], r <= 256.

    The mask is fastpeft.dropout.dropout_keep_mask(seed, M, in, p), bit for bit; kept values are scaled
    by 1/(1-p). fp32 accumulation (fp32 inputs: ~fp32 accuracy via 3xTF32).
    """
    return torch.ops.fastpeft.cuda_lora_shrink(x, a, float(p), int(seed))


# --- lora_expand ---------------------------------------------------------------------------------------
def _expand_shapes(l_mat: Tensor, rm: Tensor, bias: Tensor | None, p: float, seed: int) -> None:
    _check_2d("l_mat", l_mat)
    _check_rank("l_mat.shape[1]", l_mat.shape[1])
    _check_2d("rm", rm, l_mat.dtype)
    _check_dim("rm", rm, 0, l_mat.shape[1], "rm is [r, N] with r = l_mat.shape[1]")
    if rm.shape[1] > MAX_EXPAND_COLS:
        raise ValueError(f"rm: at most {MAX_EXPAND_COLS} columns, got shape {tuple(rm.shape)}")
    _check_bias(bias, rm.shape[1], l_mat, "l_mat")
    _check_dropout(p, seed)


@torch.library.custom_op("fastpeft::cuda_lora_expand", mutates_args=())
def _lora_expand(l_mat: Tensor, rm: Tensor, bias: Tensor | None, scale: float, p: float, seed: int) -> Tensor:
    _require_cuda(l_mat=l_mat, rm=rm, bias=bias)
    return _ext.load_extension().lora_expand(l_mat, rm, bias, scale, p, seed, _stream(l_mat))


@_lora_expand.register_fake
def _(l_mat, rm, bias, scale, p, seed):
    _expand_shapes(l_mat, rm, bias, p, seed)
    return l_mat.new_empty((l_mat.shape[0], rm.shape[1]))


def lora_expand_cuda(l_mat: Tensor, rm: Tensor, bias: Tensor | None, scale: float, p: float = 0.0,
                     seed: int = 0) -> Tensor:
    """OUT = scale * keep * (l_mat @ rm) + bias: a fresh row-major [M, N] tensor in l_mat's dtype, written once.

    l_mat [M, r], rm [r, N] (any strides: Bᵀ or A as views), bias [N] or None. keep is
    fastpeft.dropout.dropout_keep_mask(seed, M, N, p), bit for bit, where p > 0 (dropped elements: 0 + bias).
    The forward's C = s·S·Bᵀ + bias (rm = b.t()) and the backward's keep⊙(dS·A)/(1-p) (rm = a, scale = 1/(1-p)).
    """
    return torch.ops.fastpeft.cuda_lora_expand(l_mat, rm, bias, float(scale), float(p), int(seed))


# --- lora_dy_reduce ------------------------------------------------------------------------------------
def _dy_reduce_shapes(dy: Tensor, b: Tensor, s_mat: Tensor) -> None:
    _check_2d("dy", dy)
    _check_2d("b", b, dy.dtype)
    _check_2d("s_mat", s_mat, dy.dtype)
    _check_dim("b", b, 0, dy.shape[1], "b is [out, r] with out = dy.shape[1]")
    _check_rank("b.shape[1]", b.shape[1])
    _check_dim("s_mat", s_mat, 0, dy.shape[0], "s_mat is [M, r] with M = dy.shape[0]")
    _check_dim("s_mat", s_mat, 1, b.shape[1], "s_mat is [M, r] with r = b.shape[1]")


@torch.library.custom_op("fastpeft::cuda_lora_dy_reduce", mutates_args=())
def _lora_dy_reduce(dy: Tensor, b: Tensor, s_mat: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    _require_cuda(dy=dy, b=b, s_mat=s_mat)
    ds, db = _ext.load_extension().lora_dy_reduce(dy, b, s_mat, scaling, _stream(dy))
    return ds, db


@_lora_dy_reduce.register_fake
def _(dy, b, s_mat, scaling):
    _dy_reduce_shapes(dy, b, s_mat)
    r = b.shape[1]
    return dy.new_empty((dy.shape[0], r), dtype=torch.float32), dy.new_empty((dy.shape[1], r), dtype=torch.float32)


def lora_dy_reduce_cuda(dy: Tensor, b: Tensor, s_mat: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """(dS, dB) = (scaling * dy @ b, scaling * dy.T @ s_mat), both fp32, reading dy once (twice where that leaves
    the GPU too few blocks within the workspace budget: large r·M and r·N, e.g. r = 128 at M = 8192).

    dy [M, out], b [out, r], s_mat [M, r] (the forward's S), one dtype. Deterministic: fixed-order fp32 partials
    over a number of ranges fixed by the shapes and the SM count, at most 4 MiB for each of dS and dB (formerly
    up to 8 + 4.25 MiB at M = 8192, out = 4096, r = 16 and 172 + 38 MiB at out = 11008, r = 128; csrc/fastpeft_cuda.h
    dy_reduce_plan), no atomics.
    """
    return torch.ops.fastpeft.cuda_lora_dy_reduce(dy, b, s_mat, float(scaling))


# --- lora_bwd_da ---------------------------------------------------------------------------------------
def _bwd_da_shapes(x: Tensor, ds: Tensor, p: float, seed: int) -> None:
    _check_2d("x", x)
    _check_2d("ds", ds, x.dtype)
    _check_dim("ds", ds, 0, x.shape[0], "ds is [M, r] with M = x.shape[0]")
    _check_rank("ds.shape[1]", ds.shape[1])
    _check_dropout(p, seed)


@torch.library.custom_op("fastpeft::cuda_lora_bwd_da", mutates_args=())
def _lora_bwd_da(x: Tensor, ds: Tensor, p: float, seed: int) -> Tensor:
    _require_cuda(x=x, ds=ds)
    return _ext.load_extension().lora_bwd_da(x, ds, p, seed, _stream(x))


@_lora_bwd_da.register_fake
def _(x, ds, p, seed):
    _bwd_da_shapes(x, ds, p, seed)
    return x.new_empty((ds.shape[1], x.shape[1]), dtype=torch.float32)


def lora_bwd_da_cuda(x: Tensor, ds: Tensor, p: float = 0.0, seed: int = 0) -> Tensor:
    """dA = ds.T @ dropout(x) as fp32 [r, in], reading x once; x [M, in], ds [M, r] (dS in x's dtype).

    The mask is that of lora_shrink_cuda(x, a, p, seed) (the forward's), regenerated; kept values scaled by 1/(1-p).
    Deterministic: fixed-order partials over a fixed number of row ranges, at most 4 MiB of workspace beside dA.
    """
    return torch.ops.fastpeft.cuda_lora_bwd_da(x, ds, float(p), int(seed))


# --- rank_update ---------------------------------------------------------------------------------------
def _rank_update_shapes(w: Tensor, b: Tensor, a: Tensor) -> None:
    _check_2d("w", w)
    _check_2d("b", b, w.dtype)
    _check_2d("a", a, w.dtype)
    _check_dim("b", b, 0, w.shape[0], "b is [out, r] with out = w.shape[0]")
    _check_rank("b.shape[1]", b.shape[1])
    _check_dim("a", a, 0, b.shape[1], "a is [r, in] with r = b.shape[1]")
    _check_dim("a", a, 1, w.shape[1], "a is [r, in] with in = w.shape[1]")


@torch.library.custom_op("fastpeft::cuda_rank_update", mutates_args=("w",))
def _rank_update(w: Tensor, b: Tensor, a: Tensor, c: float) -> None:
    _require_cuda(w=w, b=b, a=a)
    _ext.load_extension().rank_update_(w, b, a, c, _stream(w))


@_rank_update.register_fake
def _(w, b, a, c):
    _rank_update_shapes(w, b, a)


def rank_update_cuda_(w: Tensor, b: Tensor, a: Tensor, c: float) -> Tensor:
    """w += c * b @ a in place (merge c=s, unmerge c=-s, GaLore's apply step); returns w.

    w [out, in], b [out, r], a [r, in]; b @ a is never formed in memory. w must not overlap a or b.
    """
    torch.ops.fastpeft.cuda_rank_update(w, b, a, float(c))
    return w


# --- lora_decode ---------------------------------------------------------------------------------------
def _decode_shapes(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor) -> None:
    _check_2d("x", x)
    if x.shape[0] > MAX_DECODE_ROWS:
        raise ValueError(f"x: the decode kernel takes at most {MAX_DECODE_ROWS} rows, got shape {tuple(x.shape)}")
    _check_2d("w", w, x.dtype)
    _check_2d("a", a, x.dtype)
    _check_2d("b", b, x.dtype)
    _check_dim("w", w, 1, x.shape[1], "w is [out, in] with in = x.shape[1]")
    _check_dim("a", a, 1, x.shape[1], "a is [r, in] with in = x.shape[1]")
    _check_rank("a.shape[0]", a.shape[0])
    _check_dim("b", b, 0, w.shape[0], "b is [out, r] with out = w.shape[0]")
    _check_dim("b", b, 1, a.shape[0], "b is [out, r] with r = a.shape[0]")
    _check_bias(bias, w.shape[0], x, "x")


@torch.library.custom_op("fastpeft::cuda_lora_decode", mutates_args=())
def _lora_decode(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float, p: float,
                 seed: int) -> tuple[Tensor, Tensor]:
    _require_cuda(x=x, w=w, bias=bias, a=a, b=b)
    y, s = _ext.load_extension().lora_decode(x, w, bias, a, b, scaling, p, seed, _stream(x))
    return y, s


@_lora_decode.register_fake
def _(x, w, bias, a, b, scaling, p, seed):
    _decode_shapes(x, w, bias, a, b)
    _check_dropout(p, seed)
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], a.shape[0]))


def lora_decode_cuda(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
                     p: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(y, S) for M = x.shape[0] <= 16 in one launch reading w once: S = dropout(x) @ a.T (as lora_shrink_cuda,
    the same mask bit for bit) and y = x @ w.T + bias + scaling * S @ b.T, S rounded to x's dtype first.

    x [M, in], w [out, in], bias [out] or None, a [r, in], b [out, r]; y and S in x's dtype.
    """
    return torch.ops.fastpeft.cuda_lora_decode(x, w, bias, a, b, float(scaling), float(p), int(seed))
