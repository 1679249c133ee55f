"""Counter-based random numbers for DARE masks: the pure-Python Philox4x32-10 oracle.

`philox4x32_10` is the Random123 generator (Salmon et al., SC'11) with its published constants
and 10 rounds, written for clarity; every backend (C++ in csrc/cuda/philox.h, Triton in
ntkcl_fast/triton/dare.py) is checked against it bit for bit. `philox_words` is the same
function over a tensor of counters in torch integer ops, used by the reference backend to draw
whole tensors (also under torch.compile).
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3


def _check_words(words, n: int, name: str) -> tuple[int, ...]:
    words = tuple(words)
    if len(words) != n:
        raise ValueError(f"{name} must have {n} uint32 words, got {len(words)}")
    for w in words:
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= M32:
            raise ValueError(f"{name} words must be ints in [0, 2**32), got {w!r}")
    return words


def philox4x32_10(counter, key) -> tuple[int, int, int, int]:
    """Philox4x32-10 of a 4-word counter under a 2-word key (all uint32)."""
    c0, c1, c2, c3 = _check_words(counter, 4, "counter")
    k0, k1 = _check_words(key, 2, "key")
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32)
    return c0, c1, c2, c3


def _mul_hi_lo(c: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of c * m for int64 tensors c in [0, 2**32) and a uint32 constant m.

    The 64-bit product does not fit int64, so it is assembled from 16-bit halves; every partial
    sum stays below 2**34.
    """
    m_hi, m_lo = m >> 16, m & 0xFFFF
    c_hi, c_lo = c >> 16, c & 0xFFFF
    mid = c_hi * m_lo + c_lo * m_hi
    low = c_lo * m_lo + ((mid & 0xFFFF) << 16)
    return c_hi * m_hi + (mid >> 16) + (low >> 32), low & M32


def _philox_rounds(counter: torch.Tensor, key: int, seed: int) -> torch.Tensor:
    c0, c1 = counter & M32, counter >> 32
    c2 = torch.full_like(counter, key & M32)
    c3 = torch.full_like(counter, (key >> 32) & M32)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=1)


# An op of its own so torch.compile keeps the ten rounds as one opaque node: inductor fusing
# them into one integer expression takes minutes to compile, for no gain on the reference path.
@torch.library.custom_op("ntkcl_fast_reference::philox_words", mutates_args=())
def _philox_words_op(counter: torch.Tensor, key: int, seed: int) -> torch.Tensor:
    return _philox_rounds(counter, key & M64, seed & M64)


@_philox_words_op.register_fake
def _philox_words_fake(counter, key, seed):
    return counter.new_empty((counter.shape[0], 4))


def philox_words(counter: torch.Tensor, key: int, seed: int) -> torch.Tensor:
    """Philox4x32-10 of the counters (j & M, j >> 32, key & M, key >> 32) under the Philox key
    (seed & M, seed >> 32), for an int64 tensor of j >= 0: an int64 tensor [len(j), 4] of the
    four output words.

    Written with torch integer ops (no NumPy, no host loop), so the reference backend runs on any
    device and inside torch.compile graphs.
    """
    return _philox_words_op(counter, as_i64(key), as_i64(seed))


def philox_uint32(n: int, key: int, seed: int, device=None) -> torch.Tensor:
    """u(i) of the DARE keep rule for flat indices i = 0 .. n - 1, as an int64 tensor of [0, 2**32).

    Element i takes word i % 4 of counter j = i // 4 (the row-major order of the words).
    """
    words = philox_words(torch.arange((n + 3) // 4, dtype=torch.int64, device=device), key, seed)
    return words.reshape(-1)[:n]


def threshold(p: float) -> int:
    """T(p) = min(floor(p * 2**32), 2**32): element kept iff its draw u >= T(p)."""
    return min(int(float(p) * 4294967296.0), 1 << 32)  # p * 2**32 is exact in binary floating point


def tensor_key(name: str) -> int:
    """64-bit FNV-1a of the UTF-8 bytes of `name` (the per-tensor Philox key of dare_state_dict)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    h = FNV64_OFFSET
    for b in name.encode("utf-8"):
        h = ((h ^ b) * FNV64_PRIME) & M64
    return h


def as_u64(value: int, name: str) -> int:
    """A seed or key as an int in [0, 2**64); negative ints are taken modulo 2**64."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(1 << 63) <= value <= M64:
        raise ValueError(f"{name} must fit in 64 bits, got {value}")
    return value & M64


def as_i64(value: int) -> int:
    """A uint64 as the int64 with the same bits (the C++ schemas take `int`)."""
    return value - (1 << 64) if value >= (1 << 63) else value
