"""Counter-based dropout masks shared by every kernel that drops or regenerates a mask.

The stream is ours (not tl.rand) so that it is the same in every Triton version, in the PyTorch twin
(fastpeft.dropout) and in the CUDA backend. Element (row, col) of a [M, K] mask takes word col % 4 of
Philox4x32-10 with counter (col // 4, row, 0, 0) and key (seed, 0); it is kept when word >> 1 >= thr,
thr = round(p * 2**31). One Philox call serves four adjacent columns.

The seed reaches a kernel either as an int argument or, behind a constexpr flag, as a 0-d int64 tensor on the
kernel's device that the kernel loads (`dropout_seed`): the second is what a CUDA graph can replay with a fresh
seed each time, since the host never reads it. Both give the same key, so the same mask, bit for bit.
"""
import triton
import triton.language as tl

PHILOX_ROUNDS = tl.constexpr(10)


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1, N_ROUNDS: tl.constexpr):
    for _ in tl.static_range(N_ROUNDS):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def dropout_seed(seed, SEED_PTR: tl.constexpr):
    """The seed as the key takes it: `seed` itself (an int argument), or, with SEED_PTR, the value of the 0-d int64
    tensor it points to, as an int32 (its low 32 bits: all that dropout_keep's key uses, so an int and a tensor of
    the same value give the same mask)."""
    s = seed
    if SEED_PTR:
        s = tl.load(seed).to(tl.int32)
    return s


@triton.jit
def dropout_keep(seed, offs_m, col0, thr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_K] for rows offs_m and columns col0 .. col0+BLOCK_K (col0 % 4 == 0)."""
    q = col0 // 4 + tl.arange(0, BLOCK_K // 4)
    c0 = (q[None, :] + offs_m[:, None] * 0).to(tl.uint32)
    c1 = (offs_m[:, None] + q[None, :] * 0).to(tl.uint32)
    z = c0 * 0
    k0 = (z + seed).to(tl.uint32)
    r0, r1, r2, r3 = _philox4x32(c0, c1, z, z, k0, z, PHILOX_ROUNDS)
    # join twice then flatten: column 4q+j gets word j (see the module docstring)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))
    return (words >> 1).to(tl.int32) >= thr
