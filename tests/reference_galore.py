"""GaLore with Adam in float64, written from the paper's algorithm (Zhao et al., ICML 2024, Algorithm 2),
with the conventions of the galore-torch package where the paper leaves a choice open:

    every T steps (t % T == 0, t counted from 0):  U, S, Vᵀ = SVD(G_t); P_t = U[:, :r] (or V[:, :r] on the right)
    R_t = P_tᵀ·G_t                       project (left; G_t·Q_tᵀ right; P_tᵀ·G_t·Q_tᵀ both)
    M_t = b1·M + (1-b1)·R_t;  V_t = b2·V + (1-b2)·R_t²
    N_t = M_t / (sqrt(V_t) + eps)        eps outside the bias correction (transformers' AdamW)
    W  <- W - lr·sqrt(1-b2^t)/(1-b1^t) · scale · P_t·N_t
    W  <- W - lr·wd·W                    decoupled decay, applied to the updated W

Signs of singular vectors follow fastpeft's convention (largest-magnitude entry positive). Independent of
fastpeft: everything is recomputed here from the formulas.
"""
from __future__ import annotations

import math

import torch


def _side(shape, proj_type):
    m, n = shape
    return {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right"}.get(proj_type, proj_type)


def _canon(u):
    out = u.clone()
    for j in range(u.shape[1]):
        i = int(u[:, j].abs().argmax())
        if u[i, j] < 0:
            out[:, j] = -u[:, j]
    return out


class ReferenceGaLoreAdam:
    """One matrix (or, with rank=None, any tensor: plain AdamW) optimised in float64."""

    def __init__(self, w0, rank=None, gap=200, scale=1.0, proj_type="std", lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.0, correct_bias=True, moments="keep"):
        self.w = w0.detach().to(torch.float64).clone()
        self.rank, self.gap, self.scale, self.lr = rank, gap, scale, lr
        self.b1, self.b2 = betas
        self.eps, self.wd, self.correct_bias, self.moments = eps, weight_decay, correct_bias, moments
        self.side = _side(tuple(w0.shape), proj_type) if rank is not None else None
        self.t = 0
        self.m = self.v = None
        self.p = self.q = None

    def _basis(self, g):
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        r = self.rank
        p = _canon(u[:, :r]) if self.side in ("left", "full") else None
        q = _canon(vh[:r].t()).t() if self.side in ("right", "full") else None
        return p, q

    def _proj(self, g):
        r = g
        if self.p is not None:
            r = self.p.t() @ r
        if self.q is not None:
            r = r @ self.q.t()
        return r

    def step(self, grad):
        g = grad.detach().to(torch.float64)
        if self.rank is not None:
            if self.t % self.gap == 0:
                p, q = self._basis(g)
                if self.m is not None and self.moments == "reset":
                    self.m.zero_()
                    self.v.zero_()
                elif self.m is not None and self.moments == "rotate":
                    # first moment: exact change of basis; second: through the squared coefficients
                    cl = p.t() @ self.p if p is not None else None
                    cr = self.q @ q.t() if q is not None else None
                    if cl is not None:
                        self.m, self.v = cl @ self.m, (cl * cl) @ self.v
                    if cr is not None:
                        self.m, self.v = self.m @ cr, self.v @ (cr * cr)
                self.p, self.q = p, q
            g = self._proj(g)
        if self.m is None:
            self.m = torch.zeros_like(g)
            self.v = torch.zeros_like(g)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        self.t += 1
        step = self.lr
        if self.correct_bias:
            step = step * math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        n = self.m / (self.v.sqrt() + self.eps)
        if self.rank is not None:
            if self.p is not None:
                n = self.p @ n
            if self.q is not None:
                n = n @ self.q
            n = n * self.scale
        self.w = self.w - step * n
        if self.wd > 0:
            self.w = self.w - self.lr * self.wd * self.w
        return self.w


def decaying_matrix(m, n, generator, decay=0.7, noise=1e-3, dtype=torch.float32):
    """U·diag(decay**i)·Vᵀ + noise: well separated singular values, so top-r bases are well conditioned."""
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))[0]
    s = decay ** torch.arange(k, dtype=torch.float64)
    g = (u * s) @ v.t() + noise * torch.randn(m, n, generator=generator, dtype=torch.float64)
    return (g * math.sqrt(m * n) / g.norm()).to(dtype)


def load_galore_torch():
    """galore-torch's modules {"galore_projector", "adamw"}, loaded without its package __init__ (which imports
    bitsandbytes for its 8-bit optimizer), or None when it is not installed."""
    import importlib.util
    import os
    import sys
    import types

    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("_galore_torch_ref")
    pkg.__path__ = [root]
    sys.modules.setdefault("_galore_torch_ref", pkg)
    mods = {}
    for name in ("galore_projector", "adamw"):
        full = f"_galore_torch_ref.{name}"
        if full not in sys.modules:
            s = importlib.util.spec_from_file_location(full, os.path.join(root, f"{name}.py"))
            mod = importlib.util.module_from_spec(s)
            sys.modules[full] = mod
            s.loader.exec_module(mod)
        mods[name] = sys.modules[full]
    return mods


def galore_torch_with_fastpeft_signs(monkeypatch):
    """galore-torch's modules with its projector's bases given fastpeft's documented sign convention
    (fastpeft.optim.projector.canonical_signs), nothing else changed; skips the test when galore-torch is
    missing or does not import (its transformers import fails on some versions)."""
    import pytest

    from fastpeft.optim.projector import canonical_signs

    try:
        mods = load_galore_torch()
    except Exception as exc:
        pytest.skip(f"galore-torch does not import: {exc}")
    if mods is None:
        pytest.skip("galore-torch is not installed (pip install --no-deps galore-torch: its bitsandbytes dependency is "
                    "not needed, only torch and transformers)")
    proj_cls = mods["galore_projector"].GaLoreProjector
    raw = proj_cls.get_orthogonal_matrix

    def signed(self, weights, rank, type):
        out = raw(self, weights, rank, type)
        if type == "left":
            return canonical_signs(out)
        if type == "right":
            return canonical_signs(out.t()).t()
        return [canonical_signs(out[0]), canonical_signs(out[1].t()).t()]

    monkeypatch.setattr(proj_cls, "get_orthogonal_matrix", signed)
    return mods
