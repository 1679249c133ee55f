"""NaN and Inf in the inputs of every orthogonality loss give the reference's non-finite value on
every backend (API.md: no backend hides them). The shapes are odd and spread over more than one
Triton tile, so padding lanes meet the non-finite rows too."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.reference import ortho as reference

from ._ortho_helpers import pairs, rand

BAD = [float("nan"), float("inf"), float("-inf")]


def _poison(t: torch.Tensor, value: float, where=(1, 2)) -> torch.Tensor:
    t = t.clone()
    t[where] = value
    return t


def _assert_same_class(out: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """NaN where the reference is NaN, the same infinity where it is infinite."""
    out, want = out.double().cpu(), want.double().cpu()
    if torch.isnan(want):
        assert torch.isnan(out), f"{what}: got {out.item()}, reference NaN"
    else:
        assert not torch.isnan(out) and out == want if torch.isinf(want) else torch.isfinite(out), \
            f"{what}: got {out.item()}, reference {want.item()}"


def _cases(gen, device):
    f = rand(gen, (19, 21), device, torch.float32)
    p = rand(gen, (5, 21), device, torch.float32)
    basis = torch.linalg.qr(rand(gen, (21, 3), device, torch.float64))[0].float()
    layers = [rand(gen, (17, 21), device, torch.float32), rand(gen, (3, 9), device, torch.float32)]
    news = [rand(gen, (4, 21), device, torch.float32), rand(gen, (18, 9), device, torch.float32)]
    labels = torch.arange(19, device=device) % 4
    for bad in BAD:
        yield (f"feature_orthogonality {bad}", lambda b, x=_poison(f, bad): ntkcl_fast.feature_orthogonality(
            x, p, normalize=False, backend=b), lambda x=_poison(f, bad): reference.feature_orthogonality(
            x, p, False, "mean"))
        yield (f"projection_residual {bad}", lambda b, x=_poison(f, bad): ntkcl_fast.projection_residual(
            x, basis, normalize=False, backend=b), lambda x=_poison(f, bad): reference.projection_residual(
            x, basis, False, "sum"))
        bad_layers = [layers[0], _poison(layers[1], bad)]
        yield (f"gram_orthogonality {bad}", lambda b, x=bad_layers: ntkcl_fast.gram_orthogonality(x, backend=b),
               lambda x=bad_layers: reference.gram_orthogonality(x, "mean"))
        bad_old = [_poison(layers[0], bad, (16, 20)), layers[1]]
        for norm in ("l1", "fro2"):
            yield (f"cross_orthogonality {norm} {bad}",
                   lambda b, x=bad_old, n=norm: ntkcl_fast.cross_orthogonality(x, news, norm=n, backend=b),
                   lambda x=bad_old, n=norm: reference.cross_orthogonality(x, news, n))
        yield (f"ntkcl_contrastive {bad}",
               lambda b, x=_poison(f, bad): ntkcl_fast.ntkcl_contrastive(x, labels, backend=b),
               lambda x=_poison(f, bad): reference.ntkcl_contrastive(x, labels, 0.1))


@pytest.mark.parametrize("device,backend", pairs("gram_orthogonality"))
def test_non_finite_inputs_give_the_reference_class(device, backend):
    gen = torch.Generator().manual_seed(7)
    for what, fast, oracle in _cases(gen, device):
        _assert_same_class(fast(backend), oracle(), f"{what} [{backend}]")
