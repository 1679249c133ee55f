"""DARE keyed by global element index: `offset=` on dare / dare_delta_ / dare_mask, every backend
bit-identical to the scalar Philox oracle and to the matching slice of the unsharded result."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.random import M32, philox4x32_10, threshold

from ._helpers import device_backends, interpreted_triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PAIRS = device_backends("dare_")
BIG_SEED = (1 << 64) - 3
# offsets in every lane of a Philox group, across a tile and a Triton block, and past 2**32 groups
OFFSETS = [0, 1, 2, 3, 5, 255, 258, 1023, 1025, (1 << 34) + 2, (1 << 34) + 3]


def _oracle_mask(n, offset, p, seed, key):
    t = threshold(p)
    out = []
    for i in range(offset, offset + n):
        j = i // 4
        u = philox4x32_10((j & M32, j >> 32, key & M32, key >> 32), (seed & M32, seed >> 32))[i % 4]
        out.append(u >= t)
    return torch.tensor(out, dtype=torch.bool)


def _n(backend, device):
    return 301 if interpreted_triton(backend, device) else 1037  # odd, more than one tile / block


@pytest.mark.parametrize("device,backend", PAIRS)
def test_mask_with_offset_is_the_oracle(device, backend):
    n = _n(backend, device)
    for offset in OFFSETS:
        for p, seed, key in [(0.37, BIG_SEED, 11), (0.9, 7, 1 << 40)]:
            got = ntkcl_fast.dare_mask((n,), p, seed=seed, key=key, offset=offset, device=device, backend=backend)
            assert torch.equal(got.cpu(), _oracle_mask(n, offset, p, seed, key)), (offset, p)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_slices_with_offset_equal_the_whole(device, backend):
    """dare of rows [s:] with offset s * row equals rows [s:] of the whole (uneven shards, per-row q)."""
    n = _n(backend, device)
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        f = torch.randn(n, 3, generator=gen).to(dtype).to(device)
        b = torch.randn(n, 3, generator=gen).to(dtype).to(device)
        q_rows = torch.rand(n, generator=gen).add(0.5).to(device)
        whole = ntkcl_fast.dare(f, b, 0.4, seed=BIG_SEED, key=3, backend=backend)
        whole_rows = ntkcl_fast.dare(f, b, 0.4, q=q_rows, seed=BIG_SEED, key=3, backend=backend)
        whole_delta = ntkcl_fast.dare_delta_(f.clone(), 0.4, seed=BIG_SEED, key=3, backend=backend)
        for s, e in [(0, 1), (1, 2), (1, n), (5, n - 7), (n - 1, n)]:
            off = s * 3
            part = ntkcl_fast.dare(f[s:e], b[s:e], 0.4, seed=BIG_SEED, key=3, offset=off, backend=backend)
            assert torch.equal(part, whole[s:e]), (dtype, s, e)
            part = ntkcl_fast.dare(f[s:e], b[s:e], 0.4, q=q_rows[s:e], seed=BIG_SEED, key=3, offset=off,
                                   backend=backend)
            assert torch.equal(part, whole_rows[s:e]), (dtype, s, e, "rows")
            part = ntkcl_fast.dare_delta_(f[s:e].clone(), 0.4, seed=BIG_SEED, key=3, offset=off, backend=backend)
            assert torch.equal(part, whole_delta[s:e]), (dtype, s, e, "delta")
        # a flat range starting inside a row and inside a Philox group
        flat_f, flat_b = f.reshape(-1), b.reshape(-1)
        got = ntkcl_fast.dare(flat_f[7:], flat_b[7:], 0.4, seed=BIG_SEED, key=3, offset=7, backend=backend)
        assert torch.equal(got, whole.reshape(-1)[7:]), dtype


@pytest.mark.parametrize("device,backend", PAIRS)
def test_l1_rescale_takes_the_offset_mask(device, backend):
    f = torch.randn(257, dtype=torch.float64, device=device)
    b = torch.randn(257, dtype=torch.float64, device=device)
    got = ntkcl_fast.dare(f, b, 0.5, rescale="l1", seed=1, key=2, offset=9, backend=backend)
    keep = _oracle_mask(257, 9, 0.5, 1, 2).to(device)
    kept = torch.where(keep, f - b, 0.0)
    want = b + kept * ((f - b).abs().sum() / kept.abs().sum())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got == b, ~keep)


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError)])
def test_bad_offset_names_the_argument(bad, err):
    f = torch.randn(8)
    before = f.clone()
    for call in (lambda: ntkcl_fast.dare(f, f.clone(), 0.5, offset=bad),
                 lambda: ntkcl_fast.dare_delta_(f, 0.5, offset=bad),
                 lambda: ntkcl_fast.dare_mask((8,), 0.5, offset=bad)):
        with pytest.raises(err, match="offset"):
            call()
    assert torch.equal(f, before)


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if "triton" not in p.id])
def test_offset_under_compile(device, backend):
    from ._helpers import compiled
    f = torch.randn(67, device=device)
    b = torch.randn(67, device=device)

    def fn(f, b):
        return ntkcl_fast.dare(f, b, 0.3, seed=5, key=6, offset=13, backend=backend)
    assert torch.equal(compiled(fn)(f, b), fn(f, b))
