"""backend="auto" for IA3 on CUDA tensors: each pass dispatched to the backend measured fastest.

resolve_ia3_backend (ops/ia3.py) answers "measured" for auto on a CUDA device (unless FASTPEFT_AUTOTUNE=0);
ops/ia3.py `_impl("measured")` returns the two launchers below, with every backend's signatures, so
IA3LinearFunction and the torch.library ops (ia3_custom_op.py) dispatch per call by shape.

Forward and backward are chosen separately: every backend saves the same tensors (x, W, b, l: the caller's)
and no state of its forward, so a backward may follow a forward of another backend. Key: x's and l's dtypes,
rows bucketed, out and in features, scale mode, bias, and the pass (forward, or backward with the gradients
of x and l it computes). The first call of a key times torch, triton and cublas (those that can run) on
fresh tensors of the call's shapes (ops/measured.py).
"""
from __future__ import annotations

import math

from .. import autotune
from .._backend import candidates, static_default
from .ia3_backends import launchers  # (fwd, bwd) of a concrete backend
from .measured import fresh_like, measure, needs_label

OP = "ia3_linear"
_GRADS = ("dx", "dl")


def ia3_candidates(device) -> list[str]:
    """The backends timed on `device` (tests replace this to time CPU backends)."""
    return candidates(device, cuda_ok="IA3 has no CUDA C++ kernels", cublas_ok=None)


def _static(device) -> str:
    return static_default(device, op=OP)




def _key(x2, weight, bias, scale, mode, label):
    m, k = x2.shape
    return (x2.dtype, scale.dtype, f"m{autotune.m_bucket(m)}", f"n{weight.shape[0]}", f"k{k}", mode,
            "bias" if bias is not None else "nobias", label)


def _choice(x2, weight, bias, scale, mode, needs):
    """The backend of the forward (needs None) or of the backward computing needs = (dx, dl)."""
    label = "fwd" if needs is None else needs_label(_GRADS, needs)
    key = _key(x2, weight, bias, scale, mode, label)
    name = autotune.lookup(OP, key, x2.device)  # the hot path: one dict lookup
    return name if name is not None else _measure(key, x2, weight, bias, scale, mode, needs)


def _measure(key, x2, weight, bias, scale, mode, needs):
    device = x2.device

    def fresh():
        k = x2.shape[1]
        t = fresh_like((x2, weight, bias, scale), device, scales=(1.0, 1 / math.sqrt(k), 1.0, 1.0))
        if needs is None:
            return t
        dy = autotune.randn((x2.shape[0], weight.shape[0]), x2.dtype, device, autotune.generator(device, 2))
        return (*t, dy)

    def launch(name, t):
        fwd, bwd = launchers(name)
        if needs is None:
            x, w, b, l = t

            def run_fwd():
                return fwd(x, w, b, l, mode)
            return run_fwd
        x, w, b, l, dy = t

        def run_bwd():
            return bwd(dy, x, w, b, l, mode, *needs)
        return run_bwd

    return measure(OP, key, device, lambda: ia3_candidates(device), lambda: _static(device), fresh, launch)


def ia3_fwd_measured(x, weight, bias, scale, mode, out=None):
    return launchers(_choice(x, weight, bias, scale, mode, None))[0](x, weight, bias, scale, mode, out=out)


def ia3_bwd_measured(dy, x, weight, bias, scale, mode, need_dx, need_dl):
    name = _choice(x, weight, bias, scale, mode, (bool(need_dx), bool(need_dl)))
    return launchers(name)[1](dy, x, weight, bias, scale, mode, need_dx, need_dl)


def measured_choice(x2, weight, bias, scale, mode="output", needs=None) -> str:
    """The concrete backend auto runs (or would measure and run) for the forward (needs None) or the backward
    computing needs = (dx, dl). Measures on a miss."""
    return _choice(x2, weight, bias, scale, mode, None if needs is None else tuple(bool(n) for n in needs))


__all__ = ["ia3_fwd_measured", "ia3_bwd_measured", "measured_choice", "ia3_candidates", "launchers"]
