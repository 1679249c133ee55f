"""The PEFT-style helpers against PEFT's own merge_utils, given the same masks (skipped without peft)."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import merge_utils as ours

peft_mu = pytest.importorskip("peft.utils.merge_utils", reason="peft is not installed")


def _tasks(n, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]


def _feed_our_masks(monkeypatch, shape, density, seed, key, count):
    """PEFT's torch.bernoulli returns, call after call, the masks our keep rule gives tensor key + i."""
    masks = [ntkcl_fast.dare_mask(shape, 1.0 - density, seed=seed, key=key + i) for i in range(count)]
    calls = iter(masks)

    def bernoulli(probs, *a, **kw):
        return next(calls).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rescale", [True, False])
def test_random_pruning_matches_peft(monkeypatch, dtype, rescale):
    (t,) = _tasks(1, (7, 33), dtype)
    want_seed, want_key = 5, 9
    _feed_our_masks(monkeypatch, t.shape, 0.3, want_seed, want_key, 1)
    want = peft_mu.random_pruning(t, 0.3, rescale)
    monkeypatch.undo()
    got = ours.random_pruning(t, 0.3, rescale, seed=want_seed, key=want_key)
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_merges_match_peft(monkeypatch, method):
    tasks = _tasks(3, (5, 17), torch.float32, 1)
    weights = torch.tensor([0.5, 1.0, 0.7])
    _feed_our_masks(monkeypatch, (5, 17), 0.4, 2, 100, 3)
    want_linear = peft_mu.dare_linear(tasks, weights, 0.4)
    _feed_our_masks(monkeypatch, (5, 17), 0.4, 2, 100, 3)
    want_ties = peft_mu.dare_ties(tasks, weights, 0.4, method)
    monkeypatch.undo()
    assert torch.equal(ours.dare_linear(tasks, weights, 0.4, seed=2, key=100), want_linear)
    assert torch.equal(ours.dare_ties(tasks, weights, 0.4, method, seed=2, key=100), want_ties)


def test_magnitude_pruning_matches_peft_without_ties():
    (t,) = _tasks(1, (9, 31), torch.float32, 3)
    for density in (0.0, 0.1, 0.55, 0.999):
        assert torch.equal(ours.magnitude_based_pruning(t, density), peft_mu.magnitude_based_pruning(t, density))
        assert torch.equal(ours.prune(t, density, "magnitude"), peft_mu.prune(t, density, "magnitude"))
    assert ours.prune(t, 1.0, "random") is t
    with pytest.raises(ValueError):
        ours.prune(t, -0.1, "random")
    with pytest.raises(ValueError, match="method"):
        ours.prune(t, 0.5, "nope")
