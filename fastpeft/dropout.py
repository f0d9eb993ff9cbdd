"""The dropout stream of every fastpeft kernel, in PyTorch: same seed, same mask, bit for bit.

See kernels/philox.py for the definition. Used by the PyTorch backend and by the tests.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
SEED_BOUND = 2**31 - 1


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the int64 product wraps modulo 2**64 and so holds the exact 64-bit unsigned product's bits
    prod = b * a
    return (prod >> 32) & _M32, prod & _M32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(_ROUND_A, c0)
        hi1, lo1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """Integer threshold on 31-bit words: keep when word >> 1 >= thr, so P(keep) = 1 - p within 2**-31."""
    return min(int(round(p * 2.0**31)), 2**31 - 1)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask [rows, cols] of the kernels' dropout stream."""
    if not 0 <= seed <= SEED_BOUND:
        raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}], got {seed}")
    q = torch.arange(math.ceil(cols / 4), device=device, dtype=torch.int64)
    r = torch.arange(rows, device=device, dtype=torch.int64)
    c0 = q[None, :].expand(rows, -1)
    c1 = r[:, None].expand(-1, q.numel())
    z = torch.zeros_like(c0)
    words = torch.stack(philox4x32(c0, c1, z, z, seed, 0), dim=-1).reshape(rows, -1)[:, :cols]
    return (words >> 1) >= keep_threshold(p)


def new_seed() -> int:
    """Draw a seed from PyTorch's CPU generator: follows torch.manual_seed and never syncs a GPU."""
    return int(torch.randint(0, SEED_BOUND, ()))
