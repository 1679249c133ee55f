"""The Philox4x32-10 oracle against Random123's known answers, its array form, tensor_key, T(p)."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntkcl_fast.random import M32, philox4x32_10, philox_uint32, philox_words, tensor_key, threshold

from ._helpers import compiled

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


def _scalar(j, key, seed):
    return philox4x32_10((j & M32, j >> 32, key & M32, key >> 32), (seed & M32, seed >> 32))


def test_tensor_form_matches_scalar_oracle():
    rng = random.Random(0)
    for _ in range(20):
        key, seed = rng.getrandbits(64), rng.getrandbits(64)
        # counters near 0, past 2**32 (the high counter word) and at the top of int64
        js = [rng.randrange(0, 64), rng.randrange(1 << 32, 1 << 40), rng.randrange((1 << 63) - 64, 1 << 63)]
        words = philox_words(torch.tensor(js, dtype=torch.int64), key, seed)
        for j, got in zip(js, words.tolist()):
            assert tuple(got) == _scalar(j, key, seed), (j, key, seed)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 1023])
def test_flat_draws_are_word_i_mod_4_of_counter_i_div_4(n):
    key, seed = (1 << 64) - 3, 0x9E3779B97F4A7C15
    got = philox_uint32(n, key, seed).tolist()
    assert len(got) == n
    assert got == [_scalar(i // 4, key, seed)[i % 4] for i in range(n)]


def test_tensor_form_compiles_to_the_same_words():
    counter = torch.arange(37, dtype=torch.int64) * 104729
    want = philox_words(counter, 7, (1 << 64) - 1)
    assert torch.equal(compiled(lambda c: philox_words(c, 7, (1 << 64) - 1))(counter), want)


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
    """Any length, drop rate, seed and key: the C++ Philox mask equals the torch reference's."""
    import ntkcl_fast
    from ntkcl_fast import _backend
    from ntkcl_fast.reference.dare import keep_mask

    if _backend.unavailable_reason("cpu", "cpu", "dare_") is not None:
        pytest.skip("the compiled CPU kernels are not built")
    got = ntkcl_fast.dare_mask((n,), p, seed=seed, key=key, backend="cpu")
    assert bool((got == keep_mask((n,), p, seed, key)).all())


def test_philox_words_op_passes_opcheck():
    op = torch.ops.ntkcl_fast_reference.philox_words.default
    torch.library.opcheck(op, (torch.arange(9, dtype=torch.int64) * 7919, -3, 5))
