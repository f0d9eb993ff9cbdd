"""GaLore projectors: sides per proj_type, exact SVD bases, the randomized range finder (dense and factored)."""
import pytest
import torch

from fastpeft.optim import projector as pj
from reference_galore import decaying_matrix


@pytest.mark.parametrize("proj_type, tall, wide", [
    ("std", "right", "left"), ("reverse_std", "left", "right"), ("left", "left", "left"),
    ("right", "right", "right"), ("full", "full", "full"),
])
def test_projection_side(proj_type, tall, wide):
    assert pj.projection_side((40, 30), proj_type) == tall
    assert pj.projection_side((30, 40), proj_type) == wide
    assert pj.projection_side((30, 30), proj_type) == tall  # galore-torch: m >= n counts as tall


def test_svd_basis_matches_float64():
    gen = torch.Generator().manual_seed(0)
    g = decaying_matrix(23, 31, gen)
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    p, q = pj.svd_basis(g, 5, "full")
    assert p.shape == (23, 5) and q.shape == (5, 31)
    torch.testing.assert_close(p.t() @ p, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(q @ q.t(), torch.eye(5), atol=1e-5, rtol=0)
    # the same vectors up to sign, and the signs normalised: largest-magnitude entry positive
    torch.testing.assert_close((p.double().t() @ u[:, :5]).abs(), torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close((q.double() @ vh[:5].t()).abs(), torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0)
    for basis in (p, q.t()):
        idx = basis.abs().argmax(0)
        assert (basis[idx, torch.arange(5)] > 0).all()


def _captured(g, p, q):
    return pj.project(g.double(), None if p is None else p.double(), None if q is None else q.double()).norm() ** 2


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_range_finder_captures_energy(side):
    # decay 0.8 per singular value: a gradient-like spectrum. With oversampling 8 and 2 power iterations the
    # range finder's basis must capture at least 99.5% of the energy the exact top-r SVD captures.
    gen = torch.Generator().manual_seed(1)
    g = decaying_matrix(70, 90, gen, decay=0.8, noise=1e-3)
    rank = 8
    best = _captured(g, *pj.svd_basis(g.double(), rank, side))
    rnd = pj.randomized_basis_dense(g, rank, side, generator=torch.Generator().manual_seed(2))
    got = _captured(g, *rnd)
    assert got >= 0.995 * best, (got / best).item()
    for b in rnd:
        if b is not None:
            eye = torch.eye(rank)
            gram = b.t() @ b if b.shape[1] == rank else b @ b.t()
            torch.testing.assert_close(gram, eye, atol=1e-5, rtol=0)


def test_range_finder_without_power_iterations_is_worse_on_a_flat_spectrum():
    # a slowly decaying spectrum is where power iterations matter: q = 2 must beat q = 0 (and the test
    # would fail if power_iters were ignored)
    gen = torch.Generator().manual_seed(3)
    g = decaying_matrix(120, 150, gen, decay=0.97, noise=0.0)
    best = _captured(g, *pj.svd_basis(g.double(), 10, "left"))
    q0 = _captured(g, *pj.randomized_basis_dense(g, 10, "left", power_iters=0, oversample=2, generator=torch.Generator().manual_seed(4)))
    q2 = _captured(g, *pj.randomized_basis_dense(g, 10, "left", power_iters=2, oversample=2, generator=torch.Generator().manual_seed(4)))
    assert q2 > q0
    assert q2 >= 0.95 * best, (q2 / best).item()


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_factored_range_finder_equals_dense(side):
    # G = dYᵀ·X seen through X and dY only gives the same basis as the dense finder with the same seed
    gen = torch.Generator().manual_seed(5)
    tokens, m, n = 53, 26, 33
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    dy = torch.randn(tokens, m, generator=gen, dtype=torch.float64) @ torch.diag(0.7 ** torch.arange(m, dtype=torch.float64))
    g = dy.t() @ x
    fact = pj.randomized_basis_factored(x, dy, 4, side, generator=torch.Generator().manual_seed(6))
    dense = pj.randomized_basis_dense(g, 4, side, generator=torch.Generator().manual_seed(6))
    for a, b in zip(fact, dense):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_rotate_moments_identity_and_exact_first_moment():
    gen = torch.Generator().manual_seed(7)
    p = torch.linalg.qr(torch.randn(15, 4, generator=gen))[0]
    m, v = torch.randn(4, 6, generator=gen), torch.rand(4, 6, generator=gen)
    m2, v2 = m.clone(), v.clone()
    pj.rotate_moments(m2, v2, (p, None), (p, None))
    torch.testing.assert_close(m2, m)
    torch.testing.assert_close(v2, v)
    # a new basis spanning the same space, rotated: the first moment's back-projection is unchanged
    rot = torch.linalg.qr(torch.randn(4, 4, generator=gen))[0]
    pj.rotate_moments(m2, v2, (p, None), (p @ rot, None))
    torch.testing.assert_close((p @ rot) @ m2, p @ m, atol=1e-5, rtol=1e-5)
    assert (v2 >= 0).all()


@pytest.mark.parametrize("rank, shape, err", [
    (0, (4, 6), ValueError), (7, (4, 6), ValueError), (5, (4, 6), ValueError), (-1, (4, 6), ValueError),
    (2.5, (4, 6), TypeError), (True, (4, 6), TypeError), (2, (4,), ValueError), (2, (2, 3, 4), ValueError),
])
def test_check_rank(rank, shape, err):
    with pytest.raises(err, match="rank"):
        pj.check_rank(rank, shape)


def test_unknown_proj_type():
    with pytest.raises(ValueError, match="proj_type"):
        pj.projection_side((3, 4), "diag")
