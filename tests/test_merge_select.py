"""ties' magnitude select in the CPU kernel against the reference (a sort) bit for bit, at 1 and 2
threads and over several chunks, on the key distributions that take its different paths: keys
spread out (every tie kept), a run of equal keys at the threshold (ties split by index across
chunks), and few distinct values (long runs of ties at every digit)."""
from __future__ import annotations

import pytest
import torch

from ntkcl_fast import _backend
from ntkcl_fast.merge import merge_tensors

from .test_merge_tensors import _same_bits

pytestmark = pytest.mark.skipif(_backend.unavailable_reason("cpu", "cpu", "merge_tensors") is not None,
                                reason="no compiled CPU kernel")
N = 5 * 16384 + 777  # several chunks


def _deltas(kind: str, g: torch.Generator) -> torch.Tensor:
    d = torch.randn(N, generator=g, dtype=torch.float64)
    if kind == "run_at_threshold":  # 300 equal magnitudes, some negative, around the 40 % quantile
        at = d.abs().quantile(0.6).item()
        idx = torch.randperm(N, generator=g)[:300]
        d[idx] = at * torch.where(torch.rand(300, generator=g) < 0.5, -1.0, 1.0).double()
    elif kind == "few_values":
        d = torch.randint(-4, 5, (N,), generator=g).double() * 0.25
    return d


@pytest.mark.parametrize("kind", ["spread", "run_at_threshold", "few_values"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_select_routes_match_the_reference(kind, dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(N, generator=g).to(dtype) if kind == "spread" else torch.zeros(N, dtype=dtype)
    models = [(base.double() + _deltas(kind, g)).to(dtype) for _ in range(2)]
    for density in (0.4, 0.03, 0.97):
        kw = dict(method="ties", weight=[0.6, 0.8], density=density)
        want = merge_tensors(base, models, backend="torch", **kw)
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                _same_bits(merge_tensors(base, models, backend="cpu", **kw), want)
        finally:
            torch.set_num_threads(before)
