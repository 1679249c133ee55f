"""DARE with rescale="l1" (and "none") on every backend against a re-implementation of mergekit's
`sparsify.rescaled_masked_tensor` (mergekit >= 0.1), given our mask (`dare_mask`)."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import merge_utils
from ntkcl_fast.random import tensor_key

from ._helpers import assert_unchanged, assert_within_budget, compiled, device_backends, interpreted_triton, snapshot

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PAIRS = device_backends("dare_")
MULTI_PAIRS = device_backends("dare_multi_")
SEED, KEY = 11, tensor_key("layers.3.mlp.up_proj.weight")


def mergekit_l1(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescaled_masked_tensor(tensor, mask, RescaleNorm.l1), as written there."""
    masked = delta * mask
    before_scale = delta.abs().sum()
    after_scale = masked.abs().sum()
    if before_scale < eps or after_scale < eps:
        return masked
    return masked * (before_scale / after_scale)


def mergekit_work_dtype(dtype):
    """mergekit's bernoulli(): fp16 on CPU is upcast to fp32, bf16 stays bf16."""
    return torch.float32 if dtype == torch.float16 else dtype


def _pair(shape, dtype, device, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    fin = base + scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    return fin.to(device, dtype), base.to(device, dtype)


def _sizes(backend, device):
    return [(1,), (3,), (7, 13), (1023,)] + ([] if interpreted_triton(backend, device) else [(65537,), (2, 3, 5)])


def _check(got, fin, base, p, what):
    """Bit for bit for fp32/fp64 (our math dtype is mergekit's there); fp16/bf16 within the budget
    of mergekit's own computation in its work dtype, against the fp64 oracle."""
    mask = ntkcl_fast.dare_mask(fin.shape, p, seed=SEED, key=KEY, device=fin.device)
    if fin.dtype in (torch.float32, torch.float64):
        want = base + mergekit_l1(fin - base, mask)
        assert torch.equal(got, want), what
        return
    oracle = base.double() + mergekit_l1(fin.double() - base.double(), mask)
    work = mergekit_work_dtype(fin.dtype)
    eager = (base.to(work) + mergekit_l1((fin - base).to(work), mask)).to(fin.dtype)
    assert_within_budget(got, oracle, eager, what=what)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0])
def test_dare_l1_equals_mergekit(device, backend, dtype, p):
    for shape in _sizes(backend, device):
        fin, base = _pair(shape, dtype, device)
        got = ntkcl_fast.dare(fin, base, p, rescale="l1", seed=SEED, key=KEY, backend=backend)
        assert got.dtype == dtype
        _check(got, fin, base, p, (shape, p))
        delta = (fin - base).clone()
        out = ntkcl_fast.dare_delta_(delta, p, rescale="l1", seed=SEED, key=KEY, backend=backend)
        assert out is delta
        _check(delta + base if dtype in (torch.float32, torch.float64) else (delta.double() + base.double()).to(dtype),
               fin, base, p, (shape, p, "delta"))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_l1_small_norms_are_left_unscaled(device, backend):
    """mergekit: a delta or kept L1 norm below 1e-7 leaves the kept entries as they are."""
    fin, base = _pair((7, 13), torch.float32, device, scale=1e-11)
    got = ntkcl_fast.dare(fin, base, 0.5, rescale="l1", seed=SEED, key=KEY, backend=backend)
    mask = ntkcl_fast.dare_mask(fin.shape, 0.5, seed=SEED, key=KEY, device=device)
    assert torch.equal(got, base + (fin - base) * mask)
    nothing_kept = ntkcl_fast.dare(fin * 1e12, base, 1.0, rescale="l1", seed=SEED, key=KEY, backend=backend)
    assert torch.equal(nothing_kept, base)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_l1_nan_propagates_as_mergekit(device, backend):
    fin, base = _pair((1023,), torch.float32, device)
    fin[5] = float("nan")
    got = ntkcl_fast.dare(fin, base, 0.3, rescale="l1", seed=SEED, key=KEY, backend=backend)
    mask = ntkcl_fast.dare_mask(fin.shape, 0.3, seed=SEED, key=KEY, device=device)
    want = base + mergekit_l1(fin - base, mask)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rescale_none_keeps_the_kept_entries(device, backend, dtype):
    fin, base = _pair((7, 13), dtype, device)
    mask = ntkcl_fast.dare_mask(fin.shape, 0.4, seed=SEED, key=KEY, device=device)
    got = ntkcl_fast.dare(fin, base, 0.4, rescale="none", seed=SEED, key=KEY, backend=backend)
    assert torch.equal(got, ntkcl_fast.dare(fin, base, 0.4, q=1.0, seed=SEED, key=KEY, backend=backend))
    assert torch.equal(got == base, ~mask | (fin == base))


@pytest.mark.parametrize("device,backend", MULTI_PAIRS)
@pytest.mark.parametrize("rescale", ["l1", "none"])
def test_state_dict_rescale_is_per_tensor(device, backend, rescale):
    names = ["embed.weight", "layers.0.q.weight", "layers.0.q.bias", "norm.weight"]
    shapes = [(11, 3), (7, 13), (7,), (1,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    pairs = [_pair(s, d, device, i) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    fin = {n: f for n, (f, _) in zip(names, pairs)}
    base = {n: b for n, (_, b) in zip(names, pairs)}
    got = ntkcl_fast.dare_state_dict(fin, base, 0.6, rescale=rescale, seed=SEED, exclude=[r"^norm"], backend=backend)
    for n in names:
        if n.startswith("norm"):
            assert got[n] is fin[n]
            continue
        want = ntkcl_fast.dare(fin[n], base[n], 0.6, rescale=rescale, seed=SEED, key=tensor_key(n), backend="torch")
        assert torch.equal(got[n], want), n


@pytest.mark.parametrize("device,backend", PAIRS)
def test_l1_compiled_equals_eager(device, backend):
    fin, base = _pair((7, 13), torch.bfloat16, device)
    kw = dict(rescale="l1", seed=SEED, key=KEY, backend=backend)
    assert torch.equal(compiled(lambda f, b: ntkcl_fast.dare(f, b, 0.3, **kw))(fin, base),
                       ntkcl_fast.dare(fin, base, 0.3, **kw))
    d1, d2 = (fin - base).clone(), (fin - base).clone()
    compiled(lambda d: ntkcl_fast.dare_delta_(d, 0.3, **kw))(d1)
    ntkcl_fast.dare_delta_(d2, 0.3, **kw)
    assert torch.equal(d1, d2)


def test_merge_utils_l1_is_mergekit_bernoulli_given_our_mask():
    """merge_utils.random_pruning(..., "l1"): mergekit's `bernoulli(tensor, density, RescaleNorm.l1)`."""
    fin, base = _pair((7, 33), torch.float32, "cpu")
    delta = fin - base
    mask = ntkcl_fast.dare_mask(delta.shape, 1 - 0.3, seed=SEED, key=KEY)
    got = merge_utils.random_pruning(delta, 0.3, "l1", seed=SEED, key=KEY)
    assert torch.equal(got, mergekit_l1(delta, mask))
    w = torch.tensor([0.7, 1.2])
    tasks = [delta, delta.flip(0)]
    masks = [ntkcl_fast.dare_mask(delta.shape, 1 - 0.3, seed=SEED, key=KEY + i) for i in range(2)]
    want = (mergekit_l1(tasks[0], masks[0]) * w[0]).double() + (mergekit_l1(tasks[1], masks[1]) * w[1]).double()
    assert torch.equal(merge_utils.dare_linear(tasks, w, 0.3, rescale="l1", seed=SEED, key=KEY), want.float())


def test_bad_rescale_raises_before_writing():
    fin, base = _pair((5, 4), torch.float32, "cpu")
    delta = fin - base
    before = snapshot([delta])
    with pytest.raises(ValueError, match="rescale"):
        ntkcl_fast.dare_delta_(delta, 0.5, rescale="l2")
    with pytest.raises(TypeError, match="rescale"):
        ntkcl_fast.dare(fin, base, 0.5, rescale=True)
    with pytest.raises(ValueError, match="q"):
        ntkcl_fast.dare_delta_(delta, 0.5, q=0.5, rescale="l1")
    with pytest.raises(ValueError, match="q"):
        ntkcl_fast.dare_state_dict({"w": fin}, {"w": base}, 0.5, q={"w": 0.5}, rescale="none")
    assert_unchanged([delta], before)
