"""Counter-based random numbers for DARE masks: the pure-Python Philox4x32-10 oracle.

`philox4x32_10` is the Random123 generator (Salmon et al., SC'11) with its published constants
and 10 rounds, written for clarity; every backend (C++ in csrc/cuda/philox.h, Triton in
ntkcl_fast/triton/dare.py) is checked against it bit for bit. `philox_uint32` is the same
function over NumPy arrays of counters, used by the reference backend to draw whole tensors.
"""
from __future__ import annotations

import numpy as np

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


def philox_uint32(index: np.ndarray, key: int, seed: int) -> np.ndarray:
    """u(i) of the DARE keep rule for every flat index in `index` (uint64 array) -> uint32 array.

    Counter (j & M, j >> 32, key & M, key >> 32) with j = i // 4, Philox key (seed & M, seed >> 32),
    output word i % 4.
    """
    index = np.asarray(index, dtype=np.uint64)
    j = index >> np.uint64(2)
    m = np.uint64(M32)
    c0 = j & m
    c1 = j >> np.uint64(32)
    c2 = np.full_like(j, key & M32)
    c3 = np.full_like(j, (key >> 32) & M32)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        p0 = np.uint64(PHILOX_M0) * c0  # < 2**64: no overflow in uint64
        p1 = np.uint64(PHILOX_M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & m,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & m)
    lane = (index & np.uint64(3)).astype(np.int64)
    words = np.stack([c0, c1, c2, c3])
    return np.take_along_axis(words, lane[None, :], axis=0)[0].astype(np.uint32)


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
