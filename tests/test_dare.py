"""DARE / DAREx on every backend against the reference and the Philox oracle; bad inputs; opcheck."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend
from ntkcl_fast.random import M32, philox4x32_10, tensor_key, threshold
from ntkcl_fast.reference import dare as reference

from ._helpers import assert_within_budget, device_backends, interpreted_triton
from ._samples_ema_dare import prune_samples

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PAIRS = device_backends("dare_")
PRUNE_PAIRS = [p for p in device_backends("magnitude_prune_") if "triton" not in p.id]
MULTI_PAIRS = device_backends("dare_multi_")
BIG_SEED = (1 << 64) - 3
BIG_KEY = tensor_key("layers.0.attn.q_proj.weight")


def _sizes(backend, device):
    # the Triton interpreter is slow: its odd sizes stay small
    return [(1,), (3,), (1023,), (7, 13)] + ([] if interpreted_triton(backend, device) else [(65537,), (2, 3, 5)])


def _oracle_mask(n, p, seed, key):
    """The keep rule straight from the scalar Philox oracle."""
    t = threshold(p)
    out = []
    for i in range(n):
        j = i // 4
        u = philox4x32_10((j & M32, j >> 32, key & M32, key >> 32), (seed & M32, seed >> 32))[i % 4]
        out.append(u >= t)
    return torch.tensor(out, dtype=torch.bool)


def test_reference_mask_is_the_scalar_oracle():
    for p, seed, key in [(0.3, 0, 0), (0.9, BIG_SEED, BIG_KEY), (0.5, 12345, 1 << 40)]:
        assert torch.equal(reference.keep_mask((257,), p, seed, key), _oracle_mask(257, p, seed, key))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("p", [0.0, 1.0, 0.3, 0.9, 2.0 ** -33, 1e-9, 1e-6, 1 - 1e-6, 1 - 2.0 ** -40])
def test_mask_bit_identical_to_oracle(device, backend, p):
    for shape in _sizes(backend, device):
        for seed, key in [(0, 0), (BIG_SEED, BIG_KEY), (7, 1 << 33)]:
            want = reference.keep_mask(shape, p, seed, key)
            got = ntkcl_fast.dare_mask(shape, p, seed=seed, key=key, device=device, backend=backend)
            assert got.dtype == torch.bool and got.shape == torch.Size(shape)
            assert torch.equal(got.cpu(), want), (shape, seed, key)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_dare_delta_mask_is_the_dare_mask(device, backend):
    """dare_delta_ on ones with q = 1 exposes the kernel's mask in every dtype."""
    for dtype in DTYPES:
        d = torch.ones(1023, dtype=dtype, device=device)
        ntkcl_fast.dare_delta_(d, 0.37, q=1.0, seed=BIG_SEED, key=5, backend=backend)
        assert torch.equal((d != 0).cpu(), reference.keep_mask((1023,), 0.37, BIG_SEED, 5))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_keep_fraction_within_5_sigma(backend, p):
    n = 1 << 20
    kept = ntkcl_fast.dare_mask((n,), p, seed=11, key=tensor_key("w"), backend=backend).sum().item()
    q = 1 - threshold(p) / 2 ** 32
    assert abs(kept - n * q) <= 5 * math.sqrt(n * q * (1 - q))


def _inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(shape, generator=gen, dtype=torch.float64)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    return f.to(device, dtype), b.to(device, dtype)


def _oracle(f, b, p, q, seed, key):
    qq = q.double().cpu() if isinstance(q, torch.Tensor) else q
    return reference.dare(f.double().cpu(), b.double().cpu(), p, 1 - p if q is None and p < 1 else
                          (1.0 if q is None else qq), seed, key)


def _eager(f, b, p, q, seed, key):
    """What users write today: mask, multiply and divide in the tensors' dtype."""
    keep = reference.keep_mask(f.shape, p, seed, key, f.device)
    if q is None:
        q = 1 - p if p < 1 else 1.0
    if isinstance(q, torch.Tensor):
        q = q.to(f.dtype).reshape((-1,) + (1,) * (f.dim() - 1))
    return b + keep.to(f.dtype) * (f - b) / q


def _check(got, f, b, p, q, seed, key, device, backend, what=""):
    extra = 1 if interpreted_triton(backend, device) else 0
    assert got.dtype == f.dtype and got.shape == f.shape
    assert_within_budget(got, _oracle(f, b, p, q, seed, key), _eager(f, b, p, q, seed, key),
                         extra_ulps=extra, what=what)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1.0])
def test_dare_matches_reference(device, backend, dtype, p):
    for k, shape in enumerate(_sizes(backend, device)):
        f, b = _inputs(shape, dtype, device, k)
        got = ntkcl_fast.dare(f, b, p, seed=BIG_SEED, key=k, backend=backend)
        _check(got, f, b, p, None, BIG_SEED, k, device, backend, f"{shape} {dtype} p={p}")
        if p == 1.0:
            assert torch.equal(got, b)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_scalar_and_per_row_q(device, backend, dtype):
    f, b = _inputs((7, 13), dtype, device, 3)
    got = ntkcl_fast.dare(f, b, 0.7, q=0.45, seed=1, key=2, backend=backend)
    _check(got, f, b, 0.7, 0.45, 1, 2, device, backend, "scalar q")
    q = torch.rand(7, generator=torch.Generator().manual_seed(0)).add_(0.2).to(device)
    for shape in [(7, 13), (7, 3, 5)]:
        f, b = _inputs(shape, dtype, device, 4)
        got = ntkcl_fast.dare(f, b, 0.6, q=q, seed=9, key=BIG_KEY, backend=backend)
        _check(got, f, b, 0.6, q, 9, BIG_KEY, device, backend, f"row q {shape}")
        d = f.clone()
        ntkcl_fast.dare_delta_(d, 0.6, q=q, seed=9, key=BIG_KEY, backend=backend)
        zero = torch.zeros_like(f)
        _check(d, f, zero, 0.6, q, 9, BIG_KEY, device, backend, f"row q delta {shape}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_out_poisoned_and_aliasing(device, backend, dtype):
    f, b = _inputs((1023,), dtype, device, 5)
    want = ntkcl_fast.dare(f, b, 0.4, seed=3, key=4, backend="torch")
    out = torch.full_like(f, float("nan"))
    assert ntkcl_fast.dare(f, b, 0.4, seed=3, key=4, out=out, backend=backend) is out
    _check(out, f, b, 0.4, None, 3, 4, device, backend, "out=")
    for which in ("finetuned", "base"):
        f2, b2 = f.clone(), b.clone()
        target = f2 if which == "finetuned" else b2
        res = ntkcl_fast.dare(f2, b2, 0.4, seed=3, key=4, out=target, backend=backend)
        assert res is target
        assert torch.equal(res, out), which
    assert torch.equal(want, ntkcl_fast.dare(f, b, 0.4, seed=3, key=4, backend="torch"))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_uses_logical_index(device, backend):
    f, b = _inputs((13, 7), torch.float32, device, 6)
    ft, bt = f.t(), b.t()  # logical shape (7, 13), column-major storage
    got = ntkcl_fast.dare(ft, bt, 0.5, seed=2, key=3, backend=backend)
    want = ntkcl_fast.dare(ft.contiguous(), bt.contiguous(), 0.5, seed=2, key=3, backend=backend)
    assert torch.equal(got, want)
    _check(got, ft, bt, 0.5, None, 2, 3, device, backend, "transposed")
    out = torch.full((13, 7), float("nan"), device=device).t()
    ntkcl_fast.dare(ft, bt, 0.5, seed=2, key=3, out=out, backend=backend)
    assert torch.equal(out, want)
    d = ft.clone().t().contiguous().t()  # non-contiguous in place
    ntkcl_fast.dare_delta_(d, 0.5, seed=2, key=3, backend=backend)
    assert torch.equal(d, ntkcl_fast.dare_delta_(ft.contiguous(), 0.5, seed=2, key=3, backend=backend))
    step = f.reshape(-1)[::2]  # strided 1-D view
    got = ntkcl_fast.dare(step, b.reshape(-1)[::2], 0.5, seed=2, key=3, backend=backend)
    _check(got, step, b.reshape(-1)[::2], 0.5, None, 2, 3, device, backend, "strided")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_empty_and_backends_agree(device, backend):
    e = torch.empty(0, 4, device=device)
    assert ntkcl_fast.dare(e, e.clone(), 0.5, backend=backend).shape == (0, 4)
    assert ntkcl_fast.dare_mask((0,), 0.5, device=device, backend=backend).numel() == 0
    f, b = _inputs((1023,), torch.float32, device, 7)
    got = ntkcl_fast.dare(f, b, 0.25, seed=5, key=6, backend=backend)
    assert torch.equal(got, ntkcl_fast.dare(f, b, 0.25, seed=5, key=6, backend="torch"))


def _snapshot(*ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_inputs_raise_before_any_write(device, backend):
    f, b = _inputs((4, 5), torch.float32, device, 8)
    out = torch.zeros_like(f)
    before = _snapshot(f, b, out)
    bad = [
        (dict(p=-0.1), ValueError, "p"), (dict(p=1.5), ValueError, "p"), (dict(p=float("nan")), ValueError, "p"),
        (dict(p="0.5"), TypeError, "p"),
        (dict(p=0.5, q=0.0), ValueError, "q"), (dict(p=0.5, q=-1.0), ValueError, "q"),
        (dict(p=0.5, q=float("nan")), ValueError, "q"), (dict(p=0.5, q=float("inf")), ValueError, "q"),
        (dict(p=0.5, q=torch.ones(3, device=device)), ValueError, "q"),
        (dict(p=0.5, q=torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)), ValueError, "q"),
        (dict(p=0.5, q=torch.ones(4, dtype=torch.int64, device=device)), TypeError, "q"),
        (dict(p=0.5, seed=1 << 64), ValueError, "seed"), (dict(p=0.5, key=1.5), TypeError, "key"),
        (dict(p=0.5, out=torch.zeros(4, 6, device=device)), ValueError, "out"),
        (dict(p=0.5, out=torch.zeros(4, 5, dtype=torch.float64, device=device)), ValueError, "out"),
    ]
    for kw, exc, word in bad:
        with pytest.raises(exc, match=word):
            ntkcl_fast.dare(f, b, **kw, backend=backend)
        if "out" not in kw:
            with pytest.raises(exc, match=word):
                ntkcl_fast.dare_delta_(f, **kw, backend=backend)
    with pytest.raises(ValueError, match="overlaps"):  # out partly overlapping finetuned
        big = f.clone().reshape(-1)
        ntkcl_fast.dare(big[:10], b.reshape(-1)[:10], 0.5, out=big[5:15], backend=backend)
    with pytest.raises(ValueError, match="shape"):
        ntkcl_fast.dare(f, b[:3], 0.5, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ntkcl_fast.dare(f, b.double(), 0.5, backend=backend)
    with pytest.raises(TypeError, match="finetuned"):
        ntkcl_fast.dare(f.long(), b.long(), 0.5, backend=backend)
    with pytest.raises(TypeError, match="delta"):
        ntkcl_fast.dare_delta_(f.int(), 0.5, backend=backend)
    with pytest.raises(ValueError, match="q"):  # per-row q on a 1-D tensor
        ntkcl_fast.dare(f[0], b[0], 0.5, q=torch.ones(5, device=device), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ntkcl_fast.dare(f, b, 0.5, backend="nope")
    with pytest.raises(ValueError, match="shape"):
        ntkcl_fast.dare_mask((2, -1), 0.5)
    for t, w in zip((f, b, out), before):
        assert torch.equal(t, w)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_dare_state_dict_keys_excludes_and_q(device, backend):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    names = ["embed.weight", "layers.0.q.weight", "layers.0.q.bias", "layers.1.norm.weight", "head.weight",
             "step", "layers.1.q.weight"]
    fin, base = {}, {}
    for n in names:
        if n == "step":
            fin[n], base[n] = torch.tensor(3, device=device), torch.tensor(1, device=device)
            continue
        shape = (rng.randint(1, 9), rng.randint(1, 40)) if n.endswith("weight") else (rng.randint(1, 30),)
        dtype = rng.choice(DTYPES)
        fin[n] = torch.randn(shape, generator=gen).to(device, dtype)
        base[n] = torch.randn(shape, generator=gen).to(device, dtype)
    rows = torch.rand(fin["head.weight"].shape[0], generator=gen).add_(0.3).to(device)
    q = {"layers.0.q.weight": 0.5, "head.weight": rows}
    got = ntkcl_fast.dare_state_dict(fin, base, 0.6, q=q, seed=BIG_SEED, exclude=[r"norm", r"^embed"],
                                     backend=backend)
    assert list(got) == names
    for n in names:
        if n == "step" or "norm" in n or n.startswith("embed"):
            assert got[n] is fin[n]
            continue
        want = ntkcl_fast.dare(fin[n], base[n], 0.6, q=q.get(n), seed=BIG_SEED, key=tensor_key(n), backend="torch")
        _check(got[n], fin[n], base[n], 0.6, q.get(n), BIG_SEED, tensor_key(n), device, backend, n)
        assert torch.equal((got[n] != base[n]).cpu(), (want != base[n]).cpu()) or fin[n].dtype != torch.float32
    # any order of tensors gives the same result
    rev = ntkcl_fast.dare_state_dict(dict(reversed(fin.items())), base, 0.6, q=q, seed=BIG_SEED,
                                     exclude=[r"norm", r"^embed"], backend=backend)
    for n in names:
        assert torch.equal(rev[n], got[n])
    with pytest.raises(ValueError, match="keys"):
        ntkcl_fast.dare_state_dict(fin, {k: v for k, v in base.items() if k != "head.weight"}, 0.5)
    with pytest.raises(ValueError, match="exclude"):
        ntkcl_fast.dare_state_dict(fin, base, 0.5, exclude=["("])
    with pytest.raises(ValueError, match="q"):
        ntkcl_fast.dare_state_dict(fin, base, 0.5, q={"nope": 1.0})


@pytest.mark.parametrize("device,backend", PRUNE_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_magnitude_prune_exact_k(device, backend, dtype):
    gen = torch.Generator().manual_seed(1)
    cases = [torch.randn(1023, generator=gen), torch.randn(7, 13, generator=gen),
             torch.randint(-3, 4, (65537,), generator=gen).float()]  # many ties
    for x in cases:
        x = x.to(device, dtype)
        for density in (0.0, 1.0, 0.37, 0.5, 1e-4):
            d = x.clone()
            assert ntkcl_fast.magnitude_prune_(d, density, backend=backend) is d
            k = round(density * x.numel())
            keep = reference.magnitude_keep(x, k).reshape(x.shape)
            assert torch.equal(d, torch.where(keep, x, torch.zeros_like(x)))
            assert int(keep.sum()) == k
            mags = x.abs().double()
            if 0 < k < x.numel():
                assert mags[keep].min() >= mags[~keep].max()


@pytest.mark.parametrize("device,backend", PRUNE_PAIRS)
@pytest.mark.parametrize("sample", ["randn", "ties", "nan", "one"])
def test_magnitude_prune_samples_match_reference(device, backend, sample):
    """Shared samples: ties, odd sizes, and NaN, which ranks above every number and is kept first."""
    _, x, density = next(s for s in prune_samples(device) if s[0] == sample)
    k = round(density * x.numel())
    keep = reference.magnitude_keep(x, k).reshape(x.shape)
    assert int(keep.sum()) == k and bool(keep[x.isnan()].all())
    got = ntkcl_fast.magnitude_prune_(x.clone(), density, backend=backend)
    want = torch.where(keep, x, torch.zeros_like(x))
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_magnitude_prune_bad_inputs():
    d = torch.randn(10)
    before = d.clone()
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="density"):
            ntkcl_fast.magnitude_prune_(d, bad)
    with pytest.raises(TypeError, match="delta"):
        ntkcl_fast.magnitude_prune_(d.long(), 0.5)
    assert torch.equal(d, before)


def test_cpu_kernel_checks_direct_calls():
    f = torch.randn(8)
    with pytest.raises(ValueError, match="threshold"):
        torch.ops.ntkcl_fast.dare_(f, f, None, -1, 1.0, None, 0, 0)
    with pytest.raises(ValueError, match="q"):
        torch.ops.ntkcl_fast.dare_(f, f, None, 5, 0.0, None, 0, 0)
    with pytest.raises(ValueError, match="k"):
        torch.ops.ntkcl_fast.magnitude_prune_(f, 9)


def _philox_draw_kernel():
    from ._triton_philox_probe import draw  # imports triton: only where it is available
    return draw


@pytest.mark.skipif(_backend.unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu", "dare_")
                    is not None, reason="triton is not available")
def test_triton_philox_matches_oracle_on_any_counter():
    """Random123 known answers and random full-width counters: the high counter word (element
    indices past 2**34) and every key word go through the Triton Philox like through the oracle."""
    rng = random.Random(3)
    counters = [(0, 0, 0, 0), (M32,) * 4, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    keys = [(0, 0), (M32, M32), (0xA4093822, 0x299F31D0)]
    while len(counters) < 16:
        counters.append(tuple(rng.getrandbits(32) for _ in range(4)))
        keys.append((rng.getrandbits(32), rng.getrandbits(32)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.full((16 * 4,), -1, dtype=torch.int64, device=device)
    _philox_draw_kernel()[(1,)](torch.tensor(counters, dtype=torch.int64, device=device).reshape(-1),
                                torch.tensor(keys, dtype=torch.int64, device=device).reshape(-1), out, N=16)
    for c, k, g in zip(counters, keys, out.reshape(16, 4).tolist()):
        assert tuple(g) == philox4x32_10(c, k)


@pytest.mark.parametrize("device,backend", PRUNE_PAIRS)
def test_magnitude_prune_non_contiguous(device, backend):
    x = torch.randn(13, 7, generator=torch.Generator().manual_seed(2)).to(device)
    d = x.clone().t()
    ntkcl_fast.magnitude_prune_(d, 0.3, backend=backend)
    want = ntkcl_fast.magnitude_prune_(x.t().contiguous(), 0.3, backend="torch")
    assert torch.equal(d, want)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_dare_state_dict_one_launch_equals_per_tensor_calls(device, backend):
    """The batched launch (keys and q in the table) gives each tensor exactly its own dare()."""
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    fin, base = {}, {}
    for i in range(40):
        shape = rng.choice([(rng.randint(1, 300),), (rng.randint(1, 5), rng.randint(1, 50)), (0,)])
        dtype = rng.choice(DTYPES)
        fin[f"block{i}.w"] = torch.randn(shape, generator=gen).to(device, dtype)
        base[f"block{i}.w"] = torch.randn(shape, generator=gen).to(device, dtype)
    q = {name: rng.uniform(0.2, 1.0) for name in list(fin)[::3]}
    got = ntkcl_fast.dare_state_dict(fin, base, 0.7, q=q, seed=BIG_SEED, backend=backend)
    for name in fin:
        want = ntkcl_fast.dare(fin[name], base[name], 0.7, q=q.get(name), seed=BIG_SEED, key=tensor_key(name),
                               backend=backend)
        assert torch.equal(got[name], want), name
