"""Philox4x32-10 against the published known-answer vectors of Random123 (D. E. Shaw Research,
tests/kat_vectors, its six "philox4x32" lines, 7 and 10 rounds: counter[4] key[2] -> output[4], hex uint32),
so the dropout stream is checked against the generator's definition and not only against its own twins.

Checked: the round function of the PyTorch twin (fastpeft.dropout), the Triton one (kernels/philox.py, run
under the interpreter on the CPU), and the public stream itself, whose element (row 0, cols 0..3) under seed 0
is the Philox output of counter 0 and key 0.
"""
import pytest
import torch

from fastpeft.dropout import dropout_keep_mask, keep_threshold, philox4x32

from conftest import DEVICE

try:
    import triton
    import triton.language as tl

    from fastpeft.kernels.philox import PHILOX_ROUNDS, _philox4x32
except ImportError:  # pragma: no cover - triton is a dependency; the PyTorch checks still run without it
    triton = None
else:
    @triton.jit
    def _kat_kernel(C, K, OUT, ROUNDS: tl.constexpr):
        # int64 buffers hold the uint32 values; the round function sees uint32 scalars as in dropout_keep
        c0, c1 = tl.load(C).to(tl.uint32), tl.load(C + 1).to(tl.uint32)
        c2, c3 = tl.load(C + 2).to(tl.uint32), tl.load(C + 3).to(tl.uint32)
        k0, k1 = tl.load(K).to(tl.uint32), tl.load(K + 1).to(tl.uint32)
        r0, r1, r2, r3 = _philox4x32(c0, c1, c2, c3, k0, k1, ROUNDS)
        tl.store(OUT, r0.to(tl.int64))
        tl.store(OUT + 1, r1.to(tl.int64))
        tl.store(OUT + 2, r2.to(tl.int64))
        tl.store(OUT + 3, r3.to(tl.int64))


ZEROS, ONES = (0,) * 4, (0xFFFFFFFF,) * 4
PI_CTR, PI_KEY = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
KAT = [  # (rounds, counter, key, expected): Random123 tests/kat_vectors, every philox4x32 line
    (7, ZEROS, ZEROS[:2], (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, ONES, ONES[:2], (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, PI_CTR, PI_KEY, (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, ZEROS, ZEROS[:2], (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, ONES, ONES[:2], (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, PI_CTR, PI_KEY, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
IDS = [f"{name}-{rounds}" for rounds in (7, 10) for name in ("zeros", "ones", "pi")]


def test_the_stream_uses_ten_rounds():
    from fastpeft import dropout

    assert dropout.PHILOX_ROUNDS == 10
    if triton is not None:
        assert PHILOX_ROUNDS == 10


@pytest.mark.parametrize("rounds,ctr,key,expected", KAT, ids=IDS)
def test_pytorch_twin_matches_random123(rounds, ctr, key, expected):
    words = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in ctr), key[0], key[1], rounds=rounds)
    assert [int(w) for w in words] == list(expected)


def _triton_philox(ctr, key, rounds):
    if triton is None:
        pytest.skip("triton is not installed")
    out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    _kat_kernel[(1,)](torch.tensor(ctr, device=DEVICE), torch.tensor(key, device=DEVICE), out, ROUNDS=rounds)
    return [int(v) & 0xFFFFFFFF for v in out.cpu()]


@pytest.mark.parametrize("rounds,ctr,key,expected", KAT, ids=IDS)
def test_triton_round_function_matches_random123(rounds, ctr, key, expected):
    assert _triton_philox(ctr, key, rounds) == list(expected)


@pytest.mark.parametrize("word", range(4))
def test_dropout_stream_is_philox_of_row_and_column(word):
    """Seed 0, row 0, columns 0..3 read the words of counter 0 under key 0: with the keep threshold just
    above or at a word's top 31 bits, that element flips from dropped to kept (PyTorch twin and Triton)."""
    w31 = KAT[3][3][word] >> 1  # the 10-round zeros vector
    for thr, kept in ((w31 + 1, False), (w31, True)):
        p = thr / 2.0**31
        assert keep_threshold(p) == thr
        assert bool(dropout_keep_mask(0, 1, 4, p)[0, word]) is kept
        if DEVICE == "cpu":
            pytest.importorskip("triton")
        from fastpeft.kernels.lora_linear import lora_shrink

        x = torch.ones(1, 4, device=DEVICE) + torch.arange(4.0, device=DEVICE)  # never zero
        s = lora_shrink(x, torch.eye(4, device=DEVICE), p, 0, thr)  # with A = I, S = dropout(x) exactly
        assert bool(s[0, word] != 0) is kept, f"Triton stream, word {word}, thr {thr}"
