"""backend="auto" for the LoRA linear on CUDA tensors: each pass dispatched to the backend measured fastest.

fastpeft._backend.resolve_backend(..., measured=True) answers "measured" for auto on a CUDA device (unless
FASTPEFT_AUTOTUNE=0 or only one backend can run); fastpeft/ops/lora_linear.py `_impl("measured")` returns the
two launchers below, with every backend's (fwd, bwd) signature. So the public function, the module's cached
hot path (ops/lora_linear_cached.py, which resolves once per layer signature) and the custom ops all dispatch
per call, by shape, with one dict lookup (fastpeft.autotune.lookup) once a shape bucket is decided.

Forward and backward are chosen separately: the forward's key has no gradients, the backward's has the ones
it computes. Every backend computes the same S (x's dtype, [M, r]) from the same dropout stream, so a
backward may follow a forward of another backend. The first call of a key times each candidate (torch, triton,
cublas, cuda: those that can run for this rank) on fresh tensors of the call's shapes (fastpeft/autotune.py,
through ops/measured.py, which the IA3 and multi-LoRA dispatchers share).
"""
from __future__ import annotations

import math

import torch

from .. import autotune
from .._backend import candidates, static_default
from ..dropout import keep_threshold
from ..limits import LORA_MAX_RANK_CUDA, LORA_MAX_RANK_TRITON
from .lora_linear_backends import launchers
from .measured import measure, needs_label

OP = "lora_linear"
TIMING_SEED = autotune.TIMING_SEED
_GRADS = ("dx", "dA", "dB", "dbias")


def rank_reasons(r: int) -> dict:
    """triton_ok / cuda_ok / cublas_ok of resolve_backend for rank r."""
    tri = None if r <= LORA_MAX_RANK_TRITON else f"r={r} exceeds the kernels' maximum rank {LORA_MAX_RANK_TRITON}"
    cu = None if r <= LORA_MAX_RANK_CUDA else f"r={r} exceeds the CUDA kernels' maximum rank {LORA_MAX_RANK_CUDA}"
    return {"triton_ok": tri, "cuda_ok": cu, "cublas_ok": tri}  # cublas: the Triton skinny kernels' limit


def lora_candidates(device: torch.device, r: int) -> list[str]:
    """The backends timed for rank r on `device` (tests replace this to time CPU backends)."""
    return candidates(device, **rank_reasons(r))


def _static(device: torch.device, r: int) -> str:
    reasons = rank_reasons(r)
    return static_default(device, triton_ok=reasons["triton_ok"], cuda_ok=reasons["cuda_ok"], op=OP)


def _needs_label(needs) -> str:
    return needs_label(_GRADS, needs)


def _key(x2, weight, lora_a, bias, p, label):
    m, k = x2.shape
    return (x2.dtype, lora_a.dtype, f"m{autotune.m_bucket(m)}", f"n{weight.shape[0]}", f"k{k}",
            f"r{autotune.r_bucket(lora_a.shape[0])}", "bias" if bias is not None else "nobias",
            "dropout" if p > 0 else "nodropout", label)


def _fresh(device, x2, weight, lora_a, lora_b, bias):
    """Tensors of the call's shapes and dtypes, drawn from a private generator (torch's RNG untouched)."""
    g = autotune.generator(device)
    m, k = x2.shape
    n, r = weight.shape[0], lora_a.shape[0]

    def rnd(shape, dtype, scale=1.0):
        return autotune.randn(shape, dtype, device, g, scale)

    return (rnd((m, k), x2.dtype), rnd((n, k), weight.dtype, 1 / math.sqrt(k)),
            rnd((r, k), lora_a.dtype, 1 / math.sqrt(k)), rnd((n, r), lora_b.dtype, 1 / math.sqrt(r)),
            None if bias is None else rnd((n,), bias.dtype))


def _choose(key, x2, weight, lora_a, lora_b, bias, scaling, p, needs):
    device, r = x2.device, lora_a.shape[0]
    seed = TIMING_SEED if p > 0 else 0
    thr = keep_threshold(p)

    def fresh():
        t = _fresh(device, x2, weight, lora_a, lora_b, bias)
        if needs is None:
            return t
        m, n = x2.shape[0], weight.shape[0]
        s = autotune.randn((m, r), x2.dtype, device, autotune.generator(device, 1))
        dy = autotune.randn((m, n), x2.dtype, device, autotune.generator(device, 2))
        return (*t, s, dy)

    def launch(name, t):
        fwd, bwd = launchers(name)
        if needs is None:
            x, w, a, b, bs = t
            return lambda: fwd(x, w, a, b, bs, scaling, p, seed, thr)
        x, w, a, b, _, s, dy = t
        return lambda: bwd(dy, x, w, a, b, s, scaling, p, seed, thr, needs)

    return measure(OP, key, device, lambda: lora_candidates(device, r), lambda: _static(device, r), fresh, launch)


def _guard(name, device, r, p, seed):
    """The cuda backend reads a tensor seed on the host, which capture forbids: such a call takes the static default."""
    if name == "cuda" and p > 0 and isinstance(seed, torch.Tensor):
        name = _static(device, r)
        return "triton" if name == "cuda" else name
    return name


def _masked(name, mask):
    """A packed dropout mask (dropout_mask="packed") runs on the choice made for the regenerated one, except cuda,
    which has no packed kernels: triton instead. Returns (name, the mask keyword)."""
    if mask is None:
        return name, {}
    return ("triton" if name == "cuda" else name), {"mask": mask}


def lora_linear_fwd_measured(x2, weight, lora_a, lora_b, bias, scaling, p, seed, thr, mask=None):
    key = _key(x2, weight, lora_a, bias, p, "fwd")
    name = autotune.lookup(OP, key, x2.device)
    if name is None:
        name = _choose(key, x2, weight, lora_a, lora_b, bias, scaling, p, None)
    name, kw = _masked(_guard(name, x2.device, lora_a.shape[0], p, seed), mask)
    return launchers(name)[0](x2, weight, lora_a, lora_b, bias, scaling, p, seed, thr, **kw)


def lora_linear_bwd_measured(dy, x2, weight, lora_a, lora_b, s, scaling, p, seed, thr, needs, mask=None):
    needs = tuple(bool(n) for n in needs)
    key = _key(x2, weight, lora_a, None, p, _needs_label(needs))
    name = autotune.lookup(OP, key, x2.device)
    if name is None:
        name = _choose(key, x2, weight, lora_a, lora_b, None, scaling, p, needs)
    name, kw = _masked(_guard(name, x2.device, lora_a.shape[0], p, seed), mask)
    return launchers(name)[1](dy, x2, weight, lora_a, lora_b, s, scaling, p, seed, thr, needs, **kw)


def measured_choice(x2, weight, lora_a, bias=None, dropout_p: float = 0.0, needs=None) -> str:
    """The concrete backend that auto runs (or would measure and run) for a pass of these shapes: the forward
    (needs=None) or the backward computing `needs` = (dx, dA, dB, dbias). Measures on a miss."""
    label = "fwd" if needs is None else _needs_label(tuple(bool(n) for n in needs))
    key = _key(x2, weight, lora_a, bias if needs is None else None, dropout_p, label)
    name = autotune.lookup(OP, key, x2.device)
    if name is None:
        lora_b = weight.new_empty((weight.shape[0], lora_a.shape[0]), dtype=lora_a.dtype)
        name = _choose(key, x2, weight, lora_a, lora_b, bias if needs is None else None, 1.0, dropout_p,
                       None if needs is None else tuple(bool(n) for n in needs))
    return name


__all__ = ["lora_linear_fwd_measured", "lora_linear_bwd_measured", "measured_choice", "launchers",
           "lora_candidates", "rank_reasons"]
