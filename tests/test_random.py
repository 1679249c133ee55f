"""The Philox4x32-10 oracle against Random123's known answers, its array form, tensor_key, T(p)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntkcl_fast.random import M32, philox4x32_10, philox_uint32, tensor_key, threshold

# Random123 kat_vectors, philox4x32 with 10 rounds: counter, key, expected output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_random123_known_answers(counter, key, expected):
    assert philox4x32_10(counter, key) == expected


def test_array_form_matches_scalar_oracle():
    rng = random.Random(0)
    for _ in range(20):
        key, seed = rng.getrandbits(64), rng.getrandbits(64)
        # indices near 0, past 2**32 groups (counter high word) and near 2**64
        idx = [rng.randrange(0, 64), rng.randrange(1 << 34, 1 << 40), rng.randrange((1 << 64) - 64, 1 << 64)]
        got = philox_uint32(np.array(idx, dtype=np.uint64), key, seed)
        for i, g in zip(idx, got):
            j = i // 4
            want = philox4x32_10((j & M32, j >> 32, key & M32, key >> 32), (seed & M32, seed >> 32))[i % 4]
            assert int(g) == want, (i, key, seed)


def test_bad_words_raise():
    with pytest.raises(ValueError, match="counter"):
        philox4x32_10((0, 0, 0), (0, 0))
    with pytest.raises(ValueError, match="key"):
        philox4x32_10((0, 0, 0, 0), (0, 1 << 32))


@pytest.mark.parametrize("name,expected", [("", 0xCBF29CE484222325), ("a", 0xAF63DC4C8601EC8C),
                                           ("foobar", 0x85944171F73967E8)])
def test_tensor_key_is_fnv1a_64(name, expected):
    assert tensor_key(name) == expected


def test_tensor_key_utf8_and_type():
    assert tensor_key("é") != tensor_key("e")
    with pytest.raises(TypeError, match="name"):
        tensor_key(b"a")


def test_threshold_edges():
    assert threshold(0.0) == 0
    assert threshold(1.0) == 1 << 32
    assert threshold(0.5) == 1 << 31
    assert threshold(2.0 ** -40) == 0
    assert threshold(1.0 - 2.0 ** -53) == (1 << 32) - 1
    assert threshold(0.1) == int(0.1 * 2 ** 32)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), p=st.floats(0.0, 1.0), seed=st.integers(0, (1 << 64) - 1),
       key=st.integers(0, (1 << 64) - 1))
def test_compiled_cpu_mask_is_the_oracle(n, p, seed, key):
    """Any length, drop rate, seed and key: the C++ Philox mask equals the NumPy oracle's."""
    import ntkcl_fast
    from ntkcl_fast import _backend
    from ntkcl_fast.reference.dare import keep_mask

    if _backend.unavailable_reason("cpu", "cpu", "dare_") is not None:
        pytest.skip("the compiled CPU kernels are not built")
    got = ntkcl_fast.dare_mask((n,), p, seed=seed, key=key, backend="cpu")
    assert bool((got == keep_mask((n,), p, seed, key)).all())
