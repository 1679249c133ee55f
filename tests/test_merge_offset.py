"""merge_tensors(offset=): the DARE methods draw element j as global element offset + j, so a slice
merged with its offset equals that slice of the whole merge, on every backend, bit for bit."""
from __future__ import annotations

import pytest
import torch

from ntkcl_fast.merge import merge_tensors

from ._helpers import device_backends, interpreted_triton
from .test_merge_tensors import _inputs, _same_bits

PAIRS = device_backends("merge_tensors")
BIG_SEED = (1 << 64) - 3


def _n(backend, device):
    return 301 if interpreted_triton(backend, device) else 1037  # odd, more than one tile / block


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("method,rescale", [("dare_linear", "density"), ("dare_ties", "none"),
                                            ("dare_ties", "density"), ("task_arithmetic", None)])
def test_slices_with_offset_equal_the_whole(method, rescale, device, backend):
    n = _n(backend, device)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        base, models = _inputs(3, (n, 3), dtype, seed=2)
        base, models = base.to(device), [m.to(device) for m in models]
        kw = dict(method=method, weight=[0.8, -0.5, 1.2], seed=BIG_SEED, key=5, backend=backend)
        if rescale is not None:
            kw.update(density=[0.4, 0.7, 0.0], rescale=rescale)
        whole = merge_tensors(base, models, **kw)
        for s, e in [(0, 1), (1, 2), (1, n), (5, n - 7), (n - 1, n)]:
            part = merge_tensors(base[s:e], [m[s:e] for m in models], offset=3 * s, **kw)
            _same_bits(part.cpu(), whole[s:e].cpu())
        flat = merge_tensors(base.reshape(-1)[7:], [m.reshape(-1)[7:] for m in models], offset=7, **kw)
        _same_bits(flat.cpu(), whole.reshape(-1)[7:].cpu())  # starts inside a row and a Philox group


@pytest.mark.parametrize("device,backend", PAIRS)
def test_l1_rescale_takes_the_offset_mask(device, backend):
    """rescale="l1" with an offset: the mask of the offset, the norms of the tensor given."""
    n = _n(backend, device)
    base, models = _inputs(2, (n,), torch.float64, seed=4)
    base, models = base.to(device), [m.to(device) for m in models]
    kw = dict(method="dare_linear", weight=[0.6, 0.4], density=[0.5, 0.3], rescale="l1", seed=3, key=9)
    for offset in (0, 9, 1 << 34):
        got = merge_tensors(base, models, offset=offset, backend=backend, **kw)
        want = merge_tensors(base, models, offset=offset, backend="torch", **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if offset:
            assert not torch.equal(got, merge_tensors(base, models, backend=backend, **kw))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_offset(device, backend):
    base, models = _inputs(1, (4,), torch.float32)
    for bad, error in [(-1, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="offset"):
            merge_tensors(base.to(device), [models[0].to(device)], method="dare_linear", density=0.5, offset=bad,
                          backend=backend)
