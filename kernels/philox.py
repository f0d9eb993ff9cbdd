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
    # the key is one for every element: scalar round keys, so each round's key schedule is two scalar adds,
    # not two [BLOCK_M, BLOCK_K / 4] tensor adds
    k0 = seed.to(tl.uint32)
    r0, r1, r2, r3 = _philox4x32(c0, c1, z, z, k0, k0 * 0, PHILOX_ROUNDS)
    # join twice then flatten: column 4q+j gets word j (see the module docstring)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))
    return (words >> 1).to(tl.int32) >= thr


# ------------------------------------------------------------------------- packed masks (dropout_mask="packed")
# The keep-mask of x [M, K] as bits, [M, ceil(K/8)] uint8: bit j of byte c is column 8c+j; bits past column K-1
# are 0. The forward's shrink writes it while it draws the mask; the backward's dX GEMM and dA kernel read it
# instead of running Philox again (fastpeft/ops/lora_linear.py has the tradeoff).


@triton.jit
def dropout_keep_and_bits(seed, offs_m, col0, thr, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(dropout_keep's [BLOCK_M, BLOCK_K] tile, the same mask as bytes [BLOCK_M, BLOCK_K // 8] uint8 in the layout
    above, columns >= K 0 in both). The counters come as [BLOCK_M, BLOCK_K // 8, 2] (counter q = 2c + i covers
    columns 4q .. 4q+3 of byte c): each word's 4 keep bits make a nibble elementwise and byte c joins its two
    nibbles, with no [BLOCK_M, BLOCK_K] tile reshaped into bytes (that shuffle spilled)."""
    q = col0 // 4 + 2 * tl.arange(0, BLOCK_K // 8)[:, None] + tl.arange(0, 2)[None, :]
    c0 = (q[None, :, :] + offs_m[:, None, None] * 0).to(tl.uint32)
    c1 = (offs_m[:, None, None] + q[None, :, :] * 0).to(tl.uint32)
    z = c0 * 0
    k0 = seed.to(tl.uint32)
    r0, r1, r2, r3 = _philox4x32(c0, c1, z, z, k0, k0 * 0, PHILOX_ROUNDS)
    col = 4 * q[None, :, :]
    b0 = ((r0 >> 1).to(tl.int32) >= thr) & (col < K)
    b1 = ((r1 >> 1).to(tl.int32) >= thr) & (col + 1 < K)
    b2 = ((r2 >> 1).to(tl.int32) >= thr) & (col + 2 < K)
    b3 = ((r3 >> 1).to(tl.int32) >= thr) & (col + 3 < K)
    # [c, i, a, b] -> column 8c + 4i + 2a + b: word 2a + b of counter 2c + i (dropout_keep's order)
    keep = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BLOCK_M, BLOCK_K))
    nib = b0.to(tl.int32) | (b1.to(tl.int32) << 1) | (b2.to(tl.int32) << 2) | (b3.to(tl.int32) << 3)
    lo, hi = tl.split(nib)
    return keep, (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def store_keep_bits(MASK, stride_mask, bits, offs_m, col0, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store bytes [BLOCK_M, BLOCK_K // 8] (dropout_keep_and_bits') of rows offs_m and columns col0 ..
    col0+BLOCK_K (col0 % 8 == 0) into MASK [M, ceil(K/8)] with row stride stride_mask."""
    c = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    ptrs = MASK + offs_m[:, None].to(tl.int64) * stride_mask + c[None, :]
    tl.store(ptrs, bits, mask=(offs_m < M)[:, None] & (c < tl.cdiv(K, 8))[None, :])


@triton.jit
def load_keep_bits(MASK, stride_mask, rows, col0, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask [BLOCK_M, BLOCK_K] of rows `rows` (in bounds) and columns col0 .. col0+BLOCK_K (col0 % 8 == 0)
    read from MASK [M, ceil(K/8)] (row stride stride_mask): dropout_keep's values, one byte per 8 columns."""
    c = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    b = tl.load(MASK + rows[:, None].to(tl.int64) * stride_mask + c[None, :], mask=(c < tl.cdiv(K, 8))[None, :],
                other=0).to(tl.int32)
    # bit t of a byte is column 8c + t; joins put t = 4e + 2m + o in order (as dropout_keep's words), in-thread
    lo = tl.join(tl.join(b & 1, (b >> 4) & 1), tl.join((b >> 2) & 1, (b >> 6) & 1))
    hi = tl.join(tl.join((b >> 1) & 1, (b >> 5) & 1), tl.join((b >> 3) & 1, (b >> 7) & 1))
    return tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K)) != 0


# ------------------------------------------------------------------------- the stream's cost alone (benchmarks)

@triton.jit(do_not_specialize=["seed", "thr"])
def _dropout_count_kernel(COUNT, M, K, seed, thr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kept elements of one [BLOCK_M, BLOCK_K] tile of the [M, K] mask, to COUNT[program]: the mask drawn and
    reduced, no operand read (benchmarks/bench_dropout.py times it)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, offs_m, pid_k * BLOCK_K, thr, BLOCK_M, BLOCK_K)
    keep = keep & (offs_m < M)[:, None] & (offs_k < K)[None, :]
    tl.store(COUNT + pid_m * tl.num_programs(1) + pid_k, tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0))


COUNT_CONFIG = dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=1)  # in tests/test_lora_dropout_static.py


def dropout_count(rows: int, cols: int, seed: int, thr: int, device, config: dict | None = None):
    """Number of kept elements (a 0-d int64 tensor on `device`) of the [rows, cols] mask of the stream."""
    import torch

    cfg = config or COUNT_CONFIG
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_K"]))
    count = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=device)
    _dropout_count_kernel[grid](count, rows, cols, seed, thr, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"],
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return count.sum(dtype=torch.int64)
