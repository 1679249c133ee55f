"""ntkcl_contrastive on every backend against the fp64 reference."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.reference import ortho as reference

from ._ortho_helpers import DTYPES, cases, check, eager_contrastive, pairs, rand


# ----------------------------------------------------------------------------- ntkcl_contrastive

SMALL_NC = [(2, 1), (5, 3), (33, 64)]
LARGE_NC = [(256, 768), (96, 1536)]
_NC_COMBOS = [(dt, t) for dt in DTYPES for t in (0.01, 0.1, 1.0)]
_NC_LARGE = [(torch.float32, 0.01), (torch.bfloat16, 0.1), (torch.float64, 1.0), (torch.float16, 0.1)]


@pytest.mark.parametrize("device,backend,shape,dtype,temperature",
                         cases(pairs("ntkcl_contrastive"), SMALL_NC, LARGE_NC, _NC_COMBOS, _NC_LARGE))
def test_ntkcl_contrastive(device, backend, shape, dtype, temperature):
    n, d = shape
    gen = torch.Generator().manual_seed(n * 7 + d)
    f = rand(gen, (n, d), device, dtype)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=gen).to(device)
    labels[1] = labels[0]  # at least one positive pair

    def fast(f, y):
        return ntkcl_fast.ntkcl_contrastive(f, y, temperature=temperature, backend=backend)

    check(fast, lambda f, y: reference.ntkcl_contrastive(f, y, temperature), eager_contrastive(temperature),
           [f, labels], backend=backend, device=device, what=f"nc {n}x{d} t={temperature}")


@pytest.mark.parametrize("device,backend", pairs("ntkcl_contrastive"))
@pytest.mark.parametrize("n", [1, 2, 7])
def test_ntkcl_contrastive_no_positive_pair_is_inf(device, backend, n):
    f = torch.randn(n, 16).to(device).requires_grad_()
    out = ntkcl_fast.ntkcl_contrastive(f, torch.arange(n, device=device), backend=backend)
    assert torch.isinf(out) and out > 0
    out.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


@pytest.mark.parametrize("device,backend", pairs("ntkcl_contrastive"))
def test_ntkcl_contrastive_zero_rows(device, backend):
    f = torch.randn(6, 16).to(device)
    f[3] = 0
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    leaf = f.clone().requires_grad_()
    out = ntkcl_fast.ntkcl_contrastive(leaf, labels, temperature=0.05, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(leaf.grad).all()
    want = reference.ntkcl_contrastive(f.double(), labels, 0.05)
    assert abs(out.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


