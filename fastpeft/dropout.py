"""The dropout stream of every fastpeft kernel, in PyTorch: same seed, same mask, bit for bit.

See kernels/philox.py for the definition. Used by the PyTorch backend and by the tests.

A seed is a Python int, or a 0-d integer tensor holding one (on any device): the form a CUDA graph can replay
with a fresh value each time (`draw_seed`). A tensor seed is never read on the host: the key schedule runs as
tensor ops on its value, so the mask comes out the same, bit for bit, without a device sync.
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


def philox4x32(c0, c1, c2, c3, k0, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words.

    k0: an int, or a 0-d int64 tensor holding a uint32 (its round keys are then computed on its device in one
    go, never read on the host)."""
    if isinstance(k0, torch.Tensor):  # round keys k0 + i·KEY_A mod 2**32, i < rounds, as views of one tensor
        k0s = (torch.arange(rounds, dtype=torch.int64, device=k0.device) * _KEY_A + k0) & _M32
        k0s = k0s.unbind(0)
    else:
        k0s = [(k0 + i * _KEY_A) & _M32 for i in range(rounds)]
    for i in range(rounds):
        hi0, lo0 = _mulhilo(_ROUND_A, c0)
        hi1, lo1 = _mulhilo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0s[i], lo1, hi0 ^ c3 ^ k1, lo0
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """Integer threshold on 31-bit words: keep when word >> 1 >= thr, so P(keep) = 1 - p within 2**-31."""
    return min(int(round(p * 2.0**31)), 2**31 - 1)


def dropout_keep_mask(seed, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask [rows, cols] of the kernels' dropout stream, on `device`.

    seed: an int in [0, SEED_BOUND], or a 0-d integer tensor (its low 32 bits key the stream, as in the
    kernels), which is never read on the host: no sync, and a CUDA graph replays it. device defaults to a
    tensor seed's device, else the CPU. A CPU tensor seed works with any device (torch reads 0-d CPU tensors
    as scalars); a seed on another accelerator is copied to `device`.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(f"seed: expected an int or a 0-d integer tensor, "
                             f"got shape {tuple(seed.shape)}, {seed.dtype}")
        if device is None:
            device = seed.device
        elif seed.device.type != "cpu" and seed.device != torch.device(device):
            seed = seed.to(device)
        key = seed.to(torch.int64) & _M32
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_BOUND:
        raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}] or a 0-d integer tensor, got {seed!r}")
    else:
        key = seed
    q = torch.arange(math.ceil(cols / 4), device=device, dtype=torch.int64)
    r = torch.arange(rows, device=device, dtype=torch.int64)
    c0 = q[None, :].expand(rows, -1)
    c1 = r[:, None].expand(-1, q.numel())
    z = torch.zeros_like(c0)
    words = torch.stack(philox4x32(c0, c1, z, z, key, 0), dim=-1).reshape(rows, -1)[:, :cols]
    return (words >> 1) >= keep_threshold(p)


def new_seed() -> int:
    """Draw a seed from PyTorch's CPU generator: follows torch.manual_seed and never syncs a GPU."""
    return int(torch.randint(0, SEED_BOUND, ()))


_capturing = torch.cuda.is_current_stream_capturing


def draw_seed(device: torch.device) -> int | torch.Tensor:
    """The seed of one dropout call on `device`: new_seed() (a Python int), except while the current CUDA stream
    is being captured into a graph, where an int would be baked into the graph and every replay would repeat
    one mask. There it is a 0-d int64 tensor drawn on `device` by torch.randint: CUDA's generator is
    graph-safe (each replay advances its philox offset), so each replay draws a fresh seed, which the kernels
    and dropout_keep_mask read on the device. Only a CUDA device pays for the capture check."""
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) == "cuda" and _capturing():
        return torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=device)
    return new_seed()


def traced_seed(seed, p: float, device: torch.device) -> torch.Tensor | None:
    """The seed of a traced (torch.compile) call with dropout probability p on `device`: None without dropout (no RNG
    op in the graph), else a 0-d int64 tensor: drawn in the graph on `device` when `seed` is None (fresh every call
    and every CUDA graph replay), the caller's 0-d int64 tensor (on the CPU or on `device`) as it is, or an int made
    a tensor on `device`."""
    if p == 0:
        return None
    if seed is None:
        return torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype != torch.int64 or (seed.device.type != "cpu" and seed.device != device):
            raise ValueError(f"seed: expected a 0-d torch.int64 tensor on the CPU or on {device} (x's device), "
                             f"got shape {tuple(seed.shape)}, {seed.dtype} on {seed.device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_BOUND:
        raise ValueError(f"seed: expected an int in [0, {SEED_BOUND}], a 0-d int64 tensor or None, got {seed!r}")
    return torch.full((), seed, dtype=torch.int64, device=device)  # (torch.tensor breaks Dynamo on meta x)


# dropout_mask: how the backward gets the forward's mask. "regenerate" (default): recomputed from the seed, nothing
# stored. "packed": stored as bits by the forward, [M, ceil(in/8)] uint8 (kernels/philox.py has the layout).
DROPOUT_MASKS = ("regenerate", "packed")


def check_dropout_mask(value) -> str:
    if value not in DROPOUT_MASKS or not isinstance(value, str):
        raise ValueError(f"dropout_mask: expected one of {DROPOUT_MASKS}, got {value!r}")
    return value


def packed_mask_shape(rows: int, cols: int) -> tuple[int, int]:
    return rows, (cols + 7) // 8


def pack_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean keep-mask [rows, cols] as bits [rows, ceil(cols/8)] uint8: bit j of byte c is column 8c+j (past
    the last column: 0), the layout the kernels write."""
    rows, cols = keep.shape
    padded = torch.nn.functional.pad(keep.to(torch.uint8), (0, (-cols) % 8)).view(rows, -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=keep.device)
    return (padded * weights).sum(-1, dtype=torch.uint8)


def unpack_keep_mask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """pack_keep_mask's inverse: the boolean keep-mask [rows, cols] of bits [rows, ceil(cols/8)] uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[:, :, None] >> shifts) & 1).view(bits.shape[0], -1)[:, :cols].bool()
