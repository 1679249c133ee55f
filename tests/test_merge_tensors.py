"""merge_tensors: the reference against mergekit's own formulas (tests/_mergekit_peer.py), the
fused CPU kernel against the reference (bit for bit where no norm is summed), at every thread
count, under torch.compile, and its argument checks."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend
from ntkcl_fast.merge import merge_tensors
from ntkcl_fast.reference import merge as reference

from . import _mergekit_peer as peer
from ._helpers import compiled

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
needs_cpu = pytest.mark.skipif(_backend.unavailable_reason("cpu", "cpu", "merge_tensors") is not None,
                               reason="no compiled CPU kernel")


def _inputs(n_models, shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_models)]
    return base.to(dtype), [m.to(dtype) for m in models]


def tied_magnitudes(n, dtype):
    """A zero base and three models of few distinct magnitudes (long runs of ties), NaN and inf."""
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(n, dtype=dtype)
    models = [(torch.randint(-3, 4, (n,), generator=g).to(dtype) * 0.5) for _ in range(3)]
    models[1][::97] = float("nan")
    models[2][5::11] = float("inf")
    return base, models


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), f"max diff {(a.double() - b.double()).abs().max()}"


# ------------------------------------------------------------------ the reference against mergekit

@pytest.mark.parametrize("n_models", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_reference_matches_mergekit(method, n_models):
    base, models = _inputs(n_models, (37, 53))
    weights = [0.7, -0.4, 1.3][:n_models]
    densities = [0.6, 0.35, 0.9][:n_models]
    seed, key = 11, 5
    for normalize in (False, True):
        for lam in (1.0, 0.75):
            if method == "linear":
                got = merge_tensors(None, models, method=method, weight=weights, normalize=normalize,
                                    backend="torch")
                want = peer.linear(models, weights, normalize)
                torch.testing.assert_close(got, want)
                continue
            rescales = ("l1", "none", "density") if method.startswith("dare") else (None,)
            for rescale in rescales:
                got = merge_tensors(base, models, method=method, weight=weights, density=densities, lam=lam,
                                    normalize=normalize, rescale=rescale, seed=seed, key=key, backend="torch")
                keeps = [ntkcl_fast.dare_mask(base.shape, 1.0 - r, seed=seed, key=key + i)
                         for i, r in enumerate(densities)]
                sparsification = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}.get(method)
                if rescale == "density":  # the DARE paper's 1 / density, not in mergekit: kept / r by hand
                    keeps = [k.to(base.dtype) / r for k, r in zip(keeps, densities)]
                want = peer.generalized_task_arithmetic(
                    base, models, weights, densities if sparsification else [1.0] * n_models,
                    consensus=method in ("ties", "dare_ties"), sparsification=sparsification,
                    normalize=normalize, rescale_norm="l1" if rescale == "l1" else None, lambda_=lam, keeps=keeps)
                torch.testing.assert_close(got, want, msg=f"{method} normalize={normalize} lam={lam} {rescale}")


def test_reference_magnitude_ties_go_to_lower_indices():
    # |d| in {0, 1, 2}: the threshold falls inside a run of equal magnitudes
    base = torch.zeros(20)
    model = torch.tensor([1.0, -2, 1, 0, 1, 2, -1, 0, 1, 1] * 2)
    got = merge_tensors(base, [model], method="ties", density=0.3, normalize=False, backend="torch")
    want = torch.zeros(20)
    keep = [1, 5, 11, 15, 0, 2]  # the four 2s, then the first two 1s by index
    want[keep] = model[keep]
    assert torch.equal(got, want)


# ------------------------------------------------------------------------- the CPU kernel

def _cases():
    for method in METHODS:
        rescales = ("density", "l1", "none") if method.startswith("dare") else (None,)
        for rescale in rescales:
            yield method, rescale


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,rescale", list(_cases()))
@pytest.mark.parametrize("n_models,shape", [(1, (257,)), (3, (33, 65)), (4, (3, 5, 7))])
def test_cpu_matches_reference(method, rescale, dtype, n_models, shape):
    base, models = _inputs(n_models, shape, dtype, seed=n_models)
    kw = dict(method=method, weight=[0.9, -0.3, 1.7, 0.5][:n_models], density=[0.55, 0.2, 1.0, 0.0][:n_models],
              lam=0.8, seed=3, key=2**64 - 2)
    if rescale is not None:
        kw["rescale"] = rescale
    for normalize in (False, True):
        b = None if method == "linear" else base
        got = merge_tensors(b, models, normalize=normalize, backend="cpu", **kw)
        want = merge_tensors(b, models, normalize=normalize, backend="torch", **kw)
        if rescale == "l1":  # norms summed in another order: within rounding of the scale
            torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
        else:
            _same_bits(got, want)


@needs_cpu
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_cpu_l1_rescale_with_a_nan_norm_scales_by_nan(method):
    # a NaN norm is not below 1e-7, so that model's scale is NaN (mergekit, reference.dare.l1_rescaled):
    # under dare_linear every element it keeps is NaN, not only the NaN entry; under dare_ties its
    # NaN terms never match the elected sign and are dropped (API.md: a select, not a 0/1 mask)
    base, models = _inputs(2, (37, 53))
    models[0][3, 4] = float("nan")
    kw = dict(method=method, rescale="l1", weight=[0.9, 0.4], density=[0.5, 0.7], seed=3, key=5)
    got = merge_tensors(base, models, backend="cpu", **kw)
    want = merge_tensors(base, models, backend="torch", **kw)
    if method == "dare_linear":
        assert got.isnan().sum() > 1
    else:
        assert not got.isnan().any()
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(want), rtol=2 * torch.finfo(torch.float32).eps,
                               atol=1e-6)


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_magnitude_ties_nan_and_zeros(dtype):
    # few distinct magnitudes and NaNs: the threshold sits inside long runs of ties, split by index
    base, models = tied_magnitudes(3000, dtype)
    for density in (0.0, 0.0001, 0.3, 0.61, 0.999, 1.0):
        for method in ("ties", "task_arithmetic"):
            kw = dict(method=method, weight=[1.0, 0.5, -2.0], density=density, normalize=True)
            if method == "task_arithmetic":
                kw.pop("density")
            _same_bits(merge_tensors(base, models, backend="cpu", **kw),
                       merge_tensors(base, models, backend="torch", **kw))


@needs_cpu
@pytest.mark.parametrize("method,rescale", [("ties", None), ("dare_ties", "l1"), ("dare_linear", "density"),
                                            ("linear", None)])
def test_cpu_bit_identical_at_every_thread_count(method, rescale):
    # > 64K elements: several chunks, run in parallel; magnitudes quantized so ties straddle chunks
    g = torch.Generator().manual_seed(1)
    n = 3 * 16384 * 2 + 1001
    base = torch.randn(n, generator=g)
    models = [base + (torch.randn(n, generator=g) * 8).round() / 64 for _ in range(3)]
    kw = dict(method=method, weight=[0.5, 1.0, 0.25], density=0.4, seed=9, key=4)
    if method == "linear":
        kw.pop("density")
    if rescale:
        kw["rescale"] = rescale
    b = None if method == "linear" else base
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(merge_tensors(b, models, backend="cpu", **kw))
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        _same_bits(o, outs[0])
    want = merge_tensors(b, models, backend="torch", **kw)
    if rescale == "l1":
        torch.testing.assert_close(outs[0], want, rtol=2e-7, atol=1e-6)
    else:
        _same_bits(outs[0], want)


@needs_cpu
def test_auto_takes_the_cpu_kernel_and_compiles():
    assert _backend.resolve("auto", torch.device("cpu"), "merge_tensors") == "cpu"
    base, models = _inputs(2, (19, 23))

    def fn(b, m0, m1):
        return merge_tensors(b, [m0, m1], method="dare_ties", weight=[0.6, 0.4], density=0.5, rescale="l1",
                             seed=1, key=2)

    eager = fn(base, *models)
    _same_bits(compiled(fn)(base, *models), eager)


def test_empty_and_strided_inputs():
    base, models = _inputs(2, (8, 6))
    t = [m.t() for m in models]
    for backend in ("torch",) + (("cpu",) if _backend.unavailable_reason("cpu", "cpu", "merge_tensors") is None else ()):
        got = merge_tensors(base.t(), t, method="ties", density=0.5, backend=backend)
        want = reference.merge_tensors(base.t().contiguous(), [x.contiguous() for x in t], "ties", [1.0, 1.0],
                                       [0.5, 0.5], 1.0, True, "none", 0, 0)
        _same_bits(got.contiguous(), want)
        assert merge_tensors(base[:0], [m[:0] for m in models], method="linear", backend=backend).shape == (0, 6)


@needs_cpu
def test_op_rejects_bad_arguments_before_writing():
    op = torch.ops.ntkcl_fast.merge_tensors
    base, models = _inputs(2, (5,))
    with pytest.raises(ValueError, match="method"):
        op(base, models, "slerp", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)
    with pytest.raises(ValueError, match="rescale"):
        op(base, models, "dare_ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "l2", 0, 0)
    with pytest.raises(ValueError, match="densities\\[1\\]"):
        op(base, models, "ties", [1.0, 1.0], [1.0, 1.5], 1.0, True, "none", 0, 0)
    with pytest.raises(ValueError, match="models\\[1\\]"):
        op(base, [models[0], models[1][:4]], "ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)
    with pytest.raises(TypeError, match="models\\[0\\]"):
        op(base, [models[0].double(), models[1]], "ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)
    with pytest.raises(ValueError, match="base"):
        op(None, models, "ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)
    with pytest.raises(ValueError, match="weights"):
        op(base, models, "ties", [1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)
