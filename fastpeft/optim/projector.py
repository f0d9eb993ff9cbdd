"""GaLore projectors: which side of an m×n gradient G is projected, and how the rank-r basis is found.

A basis is a pair (P, Q): P [m, r] with orthonormal columns (left side, R = Pᵀ·G, R is [r, n]),
Q [r, n] with orthonormal rows (right side, R = G·Qᵀ, R is [m, r]), or both ("full", R = Pᵀ·G·Qᵀ, [r, r]).
Back-projection is P·N, N·Q or P·N·Q. Sides per proj_type follow galore-torch:
  std:         right if m >= n else left (the shorter side is compressed, moments are max(m, n)·r)
  reverse_std: left if m >= n else right
  left, right, full: as named.

Bases come from the exact SVD of G (`svd_basis`, forms G) or from a randomized range finder with power
iterations and a Rayleigh-Ritz step (`randomized_basis`), which touches G only through products with
skinny matrices, so it also runs on a factored gradient G = dYᵀ·X without ever forming G.

Signs: singular vectors are defined up to sign, and LAPACK, cuSOLVER and the range finder pick different
ones. Every basis here is sign-normalised (in each basis vector the entry of largest magnitude is
positive), so that the "keep the moments across a refresh" behaviour is the same on every device and for
both finders. galore-torch uses the raw signs of torch.linalg.svd: a documented difference.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("svd", "randomized")
MOMENT_POLICIES = ("keep", "reset", "rotate")
DEFAULT_OVERSAMPLE = 8
DEFAULT_POWER_ITERS = 2


class NonFiniteError(FloatingPointError):
    """The matrix a basis is computed from holds inf/NaN (callers re-raise naming the parameter)."""


def all_finite(t: torch.Tensor) -> bool:
    """Host sync: only on refresh steps, whose SVD syncs anyway (it checks LAPACK/cuSOLVER's info)."""
    return bool(torch.isfinite(t).all())


def check_proj_type(proj_type) -> str:
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type: expected one of {PROJ_TYPES}, got {proj_type!r}")
    return proj_type


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_rank(rank, shape, what: str = "rank") -> int:
    """rank must be an int in [1, min(m, n)] for a 2-D shape (m, n)."""
    if len(shape) != 2:
        raise ValueError(f"{what}: GaLore projects 2-D matrices, got a parameter of shape {tuple(shape)}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{what}: expected an int, got {type(rank).__name__} {rank!r}")
    limit = min(shape)
    if not 1 <= rank <= limit:
        raise ValueError(f"{what}: expected 1 <= rank <= min(m, n) = {limit} for shape {tuple(shape)}, got {rank}")
    return int(rank)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return int(value)


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale: expected a finite real number, got {scale!r}")
    return float(scale)


def projection_side(shape, proj_type: str) -> str:
    """'left', 'right' or 'full': which side of a `shape` = (m, n) gradient `proj_type` compresses."""
    m, n = shape
    check_proj_type(proj_type)
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def low_rank_shape(shape, rank: int, side: str) -> tuple[int, int]:
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def canonical_signs(u: torch.Tensor) -> torch.Tensor:
    """Flip columns of u so that each column's entry of largest magnitude is positive (no host sync)."""
    idx = u.abs().argmax(dim=0, keepdim=True)
    sign = torch.gather(u, 0, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign


def _finish(u_cols, v_cols, side: str, dtype):
    """Bases from left/right singular vectors given as columns ([m, r], [n, r])."""
    p = canonical_signs(u_cols).to(dtype).contiguous() if side in ("left", "full") else None
    q = canonical_signs(v_cols).t().to(dtype).contiguous() if side in ("right", "full") else None
    return p, q


def svd_basis(g: torch.Tensor, rank: int, side: str, dtype=None):
    """(P, Q) from the exact SVD of g (computed in fp32, or fp64 for fp64 input); bases stored in `dtype`."""
    dtype = dtype or g.dtype
    work = g if g.dtype in (torch.float32, torch.float64) else g.float()
    if not all_finite(work):  # linalg.svd would fail with a bare "failed to converge" (or return NaN on GPU)
        raise NonFiniteError("the gradient holds inf/NaN")
    u, _, vh = torch.linalg.svd(work, full_matrices=False)
    return _finish(u[:, :rank], vh[:rank].t(), side, dtype)


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced")[0]


def randomized_basis(apply: Callable, apply_t: Callable, shape, rank: int, side: str, *, oversample: int = DEFAULT_OVERSAMPLE,
                     power_iters: int = DEFAULT_POWER_ITERS, generator: torch.Generator | None = None,
                     device=None, dtype=torch.float32, work_dtype=torch.float32):
    """(P, Q) of an m×n matrix G seen only through apply(Z) = G·Z ([n, k] -> [m, k]) and apply_t(Y) = Gᵀ·Y.

    Halko, Martinsson & Tropp (2011), algorithms 4.4 and 5.1: sketch Y = G·Ω with k = rank + oversample
    Gaussian columns, `power_iters` rounds of Y <- G·orth(Gᵀ·orth(Y)), Q = orth(Y), then the SVD of the
    small k×n matrix B = Qᵀ·G gives approximate singular vectors. For the right side the same runs on Gᵀ.
    `apply`/`apply_t` receive and return `work_dtype` tensors; G is never formed here.
    """
    m, n = shape
    if side == "right":  # find the left singular vectors of Gᵀ
        p, q = randomized_basis(apply_t, apply, (n, m), rank, "left", oversample=oversample, power_iters=power_iters,
                                generator=generator, device=device, dtype=dtype, work_dtype=work_dtype)
        return None, p.t().contiguous()
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=device, dtype=torch.float32).to(work_dtype)
    y = apply(omega)
    for _ in range(power_iters):
        z = apply_t(_orth(y.float()).to(work_dtype))
        y = apply(_orth(z.float()).to(work_dtype))
    qy = _orth(y.float())
    bt = apply_t(qy.to(work_dtype)).float()  # Bᵀ = Gᵀ·Q, [n, k]
    # inf/NaN anywhere in G reaches Bᵀ through every product and QR: one small check before the SVD
    if not all_finite(bt):
        raise NonFiniteError("the gradient holds inf/NaN")
    vb, _, ubh = torch.linalg.svd(bt, full_matrices=False)  # Bᵀ = vb·S·ubh, so B = ubhᵀ·S·vbᵀ
    u_cols = qy @ ubh[:rank].t()
    return _finish(u_cols, vb[:, :rank], side, dtype)


def randomized_basis_dense(g: torch.Tensor, rank: int, side: str, dtype=None, **kw):
    """Randomized basis of a dense gradient g (fp32 work)."""
    work = g if g.dtype in (torch.float32, torch.float64) else g.float()
    return randomized_basis(lambda z: work @ z, lambda y: work.t() @ y, g.shape, rank, side, device=g.device,
                            dtype=dtype or g.dtype, work_dtype=work.dtype, **kw)


def randomized_basis_factored(x: torch.Tensor, dy: torch.Tensor, rank: int, side: str, dtype=None,
                              reduce: Callable | None = None, **kw):
    """Randomized basis of G = dyᵀ·x (x [M, n], dy [M, m]) through skinny products only: G·Z = dyᵀ·(x·Z),
    Gᵀ·Y = xᵀ·(dy·Y). Products run in x's dtype (no fp32 copy of x or dy); QR and SVD in fp32.

    reduce: data parallelism: every product G_i·Z (and G_iᵀ·Y) of this rank's G_i = dy_iᵀ·x_i goes through
    reduce(t) -> the average of t over the ranks, so that with the same Ω (the same generator seed) on every
    rank each rank runs the range finder of the averaged gradient (1/w)·Σ G_i, never forming it."""
    wd = x.dtype
    apply, apply_t = (lambda z: dy.t() @ (x @ z)), (lambda y: x.t() @ (dy @ y))
    if reduce is not None:
        apply = (lambda f: lambda z: reduce(f(z)).to(wd))(apply)
        apply_t = (lambda f: lambda y: reduce(f(y)).to(wd))(apply_t)
    return randomized_basis(apply, apply_t, (dy.shape[1], x.shape[1]), rank, side, device=x.device,
                            dtype=dtype or x.dtype, work_dtype=wd, **kw)


def project(g: torch.Tensor, p, q) -> torch.Tensor:
    """R = Pᵀ·G, G·Qᵀ or Pᵀ·G·Qᵀ (in g's dtype)."""
    r = g
    if p is not None:
        r = p.t().to(g.dtype) @ r
    if q is not None:
        r = r @ q.t().to(g.dtype)
    return r


def project_back(n: torch.Tensor, p, q) -> torch.Tensor:
    """P·N, N·Q or P·N·Q (forms an m×n tensor: for references and tests)."""
    out = n
    if p is not None:
        out = p.to(n.dtype) @ out
    if q is not None:
        out = out @ q.to(n.dtype)
    return out


def rotate_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, old, new) -> None:
    """Carry Adam's moments from basis `old` = (P, Q) into `new`, in place.

    The first moment is linear in R, so it maps exactly by C = P_newᵀ·P_old (and Q_old·Q_newᵀ on the right).
    The second moment is a per-coordinate variance; it maps by C∘C, which is exact when the old
    coordinates are uncorrelated and keeps v >= 0 always.
    """
    (p_old, q_old), (p_new, q_new) = old, new
    m, v = exp_avg, exp_avg_sq
    if p_new is not None:
        c = p_new.t().float() @ p_old.float()
        m.copy_(c @ m)
        v.copy_((c * c) @ v)
    if q_new is not None:
        c = q_old.float() @ q_new.t().float()
        m.copy_(m @ c)
        v.copy_(v @ (c * c))
