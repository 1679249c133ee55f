"""ntkcl_fast.merge_utils against the installed PEFT's own merge_utils (skipped without peft).

Deterministic paths are compared with PEFT directly: bit for bit (dtype included) for up to 4
tasks, where torch's CPU sum over the stacked tasks adds them in list order as our running
accumulators do; for more tasks torch associates the sum differently, so the result must be
within the error budget of PEFT's own (tests/_helpers.py). The random paths get PEFT's
torch.bernoulli fed with our masks.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import merge_utils as ours

from ._helpers import assert_within_budget, compiled, device_backends

peft_mu = pytest.importorskip("peft.utils.merge_utils", reason="peft is not installed")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(1,), (3,), (7, 13), (1023,), (2, 3, 5)]
DENSITIES = [0.0, 0.3, 1.0]
METHODS = ["total", "frequency"]
DARE_BACKENDS = [p for p in device_backends("dare_") if "cuda" not in p.id]
PRUNE_BACKENDS = [p for p in device_backends("magnitude_prune_") if "cuda" not in p.id and "triton" not in p.id]


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        yield


def _distinct(shape, dtype, gen):
    """Random values whose magnitudes are all different, so no tie at a magnitude cut leaves the
    choice to torch.topk: fp16/bf16 draw distinct bit patterns (magnitudes near 0.01 .. 100)."""
    if dtype in (torch.float32, torch.float64):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    numel = torch.Size(shape).numel()
    start = 0x2000 if dtype == torch.float16 else 0x3C00
    bits = start + torch.randperm(2 * numel, generator=gen)[:numel].to(torch.int16)
    sign = torch.randint(0, 2, (numel,), generator=gen).to(torch.int16) << 15
    return (bits | sign).view(dtype).reshape(shape)


def _tasks(n, shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [_distinct(shape, dtype, gen) for _ in range(n)]


def _weights(n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 0.5).to(dtype)


def _assert_peft_equal(got, want, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    assert torch.equal(got.isnan(), want.isnan()), what
    assert torch.equal(got.nan_to_num(), want.nan_to_num()), what


def _assert_peft_close(got, want, want64, n, what=""):
    """More tasks than torch sums in list order: within 2x PEFT's error (vs PEFT in fp64) + 1 ulp.

    An fp64 result has no wider oracle (PEFT in fp64 is PEFT itself, error 0), so there the floor
    is the first-order bound of re-associating an n-term sum, n - 1 ulps.
    """
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    assert_within_budget(got, want64, want, extra_ulps=n - 2 if got.dtype == torch.float64 else 0, what=what)


MERGES = [("task_arithmetic", ()), ("magnitude_prune", (0.3,)), ("magnitude_prune", (0.0,)),
          ("magnitude_prune", (1.0,))] + [("ties", (d, m)) for d in DENSITIES for m in METHODS]


@pytest.mark.parametrize("name,args", MERGES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_merges_equal_peft(name, args, dtype):
    for n in (1, 2, 4):
        for shape in SHAPES:
            tasks, w = _tasks(n, shape, dtype, n), _weights(n)
            _assert_peft_equal(getattr(ours, name)(tasks, w, *args), getattr(peft_mu, name)(tasks, w, *args),
                               (n, shape))


@pytest.mark.parametrize("name,args", MERGES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_merges_of_many_tasks_within_peft_budget(name, args, dtype):
    for shape in ((7, 13), (1023,)):
        tasks, w = _tasks(7, shape, dtype, 3), _weights(7)
        want64 = getattr(peft_mu, name)([t.double() for t in tasks], w.double(), *args)
        _assert_peft_close(getattr(ours, name)(tasks, w, *args), getattr(peft_mu, name)(tasks, w, *args), want64,
                           7, f"{name} {shape}")


@pytest.mark.parametrize("wdtype", [torch.float16, torch.float64])
def test_weight_dtype_promotes_as_peft(wdtype):
    """PEFT's 1-D weight tensor takes part in type promotion: fp16 tasks with fp64 weights give fp64."""
    for dtype in DTYPES:
        tasks, w = _tasks(3, (7, 13), dtype, 1), _weights(3, wdtype)
        for name, args in (("task_arithmetic", ()), ("ties", (0.3, "total")), ("magnitude_prune", (0.3,))):
            _assert_peft_equal(getattr(ours, name)(tasks, w, *args), getattr(peft_mu, name)(tasks, w, *args),
                               (name, dtype))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_mask_and_disjoint_merge_equal_peft(method, dtype):
    for n in (1, 3, 4, 7):
        for shape in SHAPES:
            stacked = torch.stack(_tasks(n, shape, dtype, n))
            stacked[0].view(-1)[0] = 0  # a zero never agrees with the elected sign
            mask = ours.calculate_majority_sign_mask(stacked, method)
            assert torch.equal(mask, peft_mu.calculate_majority_sign_mask(stacked, method)), (n, shape)
            got, want = ours.disjoint_merge(stacked, mask), peft_mu.disjoint_merge(stacked, mask)
            if n <= 4:
                _assert_peft_equal(got, want, (n, shape))
            else:
                _assert_peft_close(got, want, peft_mu.disjoint_merge(stacked.double(), mask), n, (n, shape))


def test_reshape_weight_task_tensors_equals_peft():
    stacked, w = torch.stack(_tasks(3, (2, 3, 5), torch.float32)), _weights(3)
    got = ours.reshape_weight_task_tensors(stacked, w)
    assert got.shape == peft_mu.reshape_weight_task_tensors(stacked, w).shape == (3, 1, 1, 1)
    assert got.data_ptr() == w.data_ptr()


# ------------------------------------------------------------------------------- magnitude pruning

@pytest.mark.parametrize("device,backend", PRUNE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_pruning_equals_peft(device, backend, dtype):
    for shape in SHAPES:
        (t,) = _tasks(1, shape, dtype, 3)
        for density in (0.0, 0.1, 0.3, 0.55, 0.999, 1.0):
            want = peft_mu.magnitude_based_pruning(t, density)
            _assert_peft_equal(ours.magnitude_based_pruning(t, density, backend=backend), want, (shape, density))
            _assert_peft_equal(ours.prune(t, density, "magnitude", backend=backend),
                               peft_mu.prune(t, density, "magnitude"), (shape, density))


@pytest.mark.parametrize("device,backend", PRUNE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_pruning_with_nan_equals_peft(device, backend, dtype):
    """NaN ranks above every number (PEFT: torch.topk), so NaN is kept first; a dropped inf or NaN is
    NaN in PEFT's `tensor * mask`, and in ours."""
    (t,) = _tasks(1, (1023,), dtype, 5)
    t[[3, 500, 1000]] = float("nan")
    t[17] = -float("inf")  # one infinity only: inf and -inf tie in magnitude
    t[601] = 1e30 if dtype != torch.float16 else 6e4  # the largest finite magnitude, for a tie-free cut
    for density in (0.0, 0.001, 0.003, 0.004, 0.005, 0.3, 1.0):
        got = ours.magnitude_based_pruning(t, density, backend=backend)
        _assert_peft_equal(got, peft_mu.magnitude_based_pruning(t, density), density)
        for name, args in (("ties", (density, "total")), ("magnitude_prune", (density,))):
            tasks, w = [t, _tasks(1, (1023,), dtype, 6)[0]], _weights(2)
            _assert_peft_equal(getattr(ours, name)(tasks, w, *args, backend=backend),
                               getattr(peft_mu, name)(tasks, w, *args), (name, density))


def test_magnitude_pruning_has_no_triton_kernel():
    with pytest.raises(RuntimeError, match="triton"):
        ours.magnitude_based_pruning(torch.randn(5), 0.5, backend="triton")


def test_magnitude_density_out_of_range_raises_like_peft():
    """PEFT's torch.topk raises RuntimeError when int(density * numel) leaves [0, numel]; so do we,
    with an error that is a ValueError too. Inside the range PEFT prunes, even for density < 0."""
    t = torch.randn(3, 5)
    for density in (1.5, -0.5):
        with pytest.raises(RuntimeError):
            peft_mu.magnitude_based_pruning(t, density)
        for error in (RuntimeError, ValueError):
            with pytest.raises(error, match="density"):
                ours.magnitude_based_pruning(t, density)
    _assert_peft_equal(ours.magnitude_based_pruning(t, -0.01), peft_mu.magnitude_based_pruning(t, -0.01))
    _assert_peft_equal(ours.magnitude_based_pruning(t, 1.05), peft_mu.magnitude_based_pruning(t, 1.05))
    with pytest.raises(ValueError, match="density"):
        ours.magnitude_based_pruning(t, float("nan"))


# ---------------------------------------------------------------------------------- random pruning

def _feed_our_masks(monkeypatch, shape, density, seed, key, count):
    """PEFT's torch.bernoulli returns, call after call, the masks our keep rule gives key + i."""
    masks = [ntkcl_fast.dare_mask(shape, 1.0 - density, seed=seed, key=key + i) for i in range(count)]
    calls = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda probs, *a, **kw: next(calls).to(probs.dtype))


def _peft_with_masks(monkeypatch, fn, shape, density, seed, key, count):
    _feed_our_masks(monkeypatch, shape, density, seed, key, count)
    try:
        return fn()
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("device,backend", DARE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
def test_random_pruning_equals_peft_given_the_mask(monkeypatch, device, backend, dtype, rescale):
    """Bit for bit in fp32/fp64 and where nothing is divided; fp16/bf16 division within PEFT's budget."""
    for shape in ((7, 33), (3,)):
        (t,) = _tasks(1, shape, dtype)
        t.view(-1)[1] = float("nan")
        t.view(-1)[2] = float("inf")
        want = _peft_with_masks(monkeypatch, lambda: peft_mu.random_pruning(t, 0.3, rescale), shape, 0.3, 5, 9, 1)
        got = ours.random_pruning(t, 0.3, rescale, seed=5, key=9, backend=backend)
        if rescale and dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(got.isnan(), want.isnan())
            want64 = _peft_with_masks(monkeypatch, lambda: peft_mu.random_pruning(t.double(), 0.3, True),
                                      shape, 0.3, 5, 9, 1)
            fin = ~want.isnan()
            assert_within_budget(got[fin], want64[fin], want[fin])
        else:
            _assert_peft_equal(got, want, shape)


@pytest.mark.parametrize("device,backend", DARE_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dare_merges_equal_peft_given_the_masks(monkeypatch, device, backend, method, dtype):
    tasks, w = _tasks(3, (5, 17), dtype, 1), _weights(3)
    want_linear = _peft_with_masks(monkeypatch, lambda: peft_mu.dare_linear(tasks, w, 0.4), (5, 17), 0.4, 2, 100, 3)
    want_ties = _peft_with_masks(monkeypatch, lambda: peft_mu.dare_ties(tasks, w, 0.4, method), (5, 17), 0.4, 2, 100, 3)
    _assert_peft_equal(ours.dare_linear(tasks, w, 0.4, seed=2, key=100, backend=backend), want_linear)
    _assert_peft_equal(ours.dare_ties(tasks, w, 0.4, method, seed=2, key=100, backend=backend), want_ties)


def test_random_pruning_density_out_of_range_raises_like_peft():
    """PEFT's torch.bernoulli raises RuntimeError for density outside [0, 1] (and NaN); ours raises
    an error that is both a RuntimeError and a ValueError, before anything is computed."""
    t = torch.randn(3, 5)
    for density in (1.5, -0.5, float("nan")):
        with pytest.raises(RuntimeError):
            peft_mu.random_pruning(t, density, True)
        for error in (RuntimeError, ValueError):
            with pytest.raises(error, match="density"):
                ours.random_pruning(t, density, True)
    with pytest.raises(TypeError, match="density"):
        ours.random_pruning(t, "0.5", True)
    with pytest.raises(ValueError, match="rescale"):
        ours.random_pruning(t, 0.5, "l2")


def test_density_zero_gives_zeros_where_peft_gives_nan():
    """A documented difference: PEFT divides 0 by 0; we return `tensor * 0` (NaN only from inf/NaN)."""
    t = torch.randn(4, 9)
    assert peft_mu.random_pruning(t, 0.0, True).isnan().all()
    for rescale in (True, False, "l1", "none"):
        got = ours.random_pruning(t, 0.0, rescale)
        assert torch.equal(got, torch.zeros_like(t))
    t[0, 0] = float("inf")
    assert ours.random_pruning(t, 0.0, True)[0, 0].isnan()


def test_prune_edges_match_peft():
    t = torch.randn(9, 31)
    assert ours.prune(t, 1.0, "random") is t and peft_mu.prune(t, 1.0, "random") is t
    assert ours.prune(t, 1.5, "magnitude") is t
    for fn in (ours.prune, peft_mu.prune):
        with pytest.raises(ValueError, match="(?i)density"):
            fn(t, -0.1, "random")
        with pytest.raises(ValueError, match="method"):
            fn(t, 0.5, "nope")


def test_bad_inputs_name_the_argument():
    tasks, w = _tasks(2, (3, 4), torch.float32), _weights(2)
    with pytest.raises(ValueError, match="task_tensors\\[1\\]"):
        ours.task_arithmetic([tasks[0], torch.randn(4, 3)], w)
    with pytest.raises(TypeError, match="task_tensors\\[1\\]"):
        ours.ties([tasks[0], torch.ones(3, 4, dtype=torch.int32)], w, 0.5)
    with pytest.raises(ValueError, match="weights"):
        ours.dare_linear(tasks, _weights(3), 0.5)
    with pytest.raises(TypeError, match="weights"):
        ours.task_arithmetic(tasks, [0.5, 0.5])
    with pytest.raises(ValueError, match="task_tensors"):
        ours.task_arithmetic([], w)
    for fn in (ours.ties, ours.dare_ties):
        with pytest.raises(RuntimeError, match="majority_sign_method"):
            fn(tasks, w, 0.5, "median")
    with pytest.raises(ValueError, match="majority_sign_mask"):
        ours.disjoint_merge(torch.stack(tasks), torch.ones(2, 4, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("device,backend", DARE_BACKENDS)
def test_merges_compiled_equal_eager(device, backend):
    tasks, w = _tasks(3, (7, 13), torch.float32, 2), _weights(3)
    runs = [lambda ts, w: ours.dare_ties(ts, w, 0.4, "frequency", seed=3, key=7, backend=backend),
            lambda ts, w: ours.dare_linear(ts, w, 0.4, rescale="l1", seed=3, backend=backend)]
    if backend != "triton":
        runs += [lambda ts, w: ours.ties(ts, w, 0.3, "total", backend=backend),
                 lambda ts, w: ours.magnitude_prune(ts, w, 0.3, backend=backend)]
    if backend == "torch":
        runs += [ours.task_arithmetic,
                 lambda ts, w: ours.disjoint_merge(torch.stack(ts), ours.calculate_majority_sign_mask(torch.stack(ts)))]
    for fn in runs:
        _assert_peft_equal(compiled(fn)(tasks, w), fn(tasks, w))


# ------------------------------------------------------------------------------------ peak memory

def _peak_bytes(fn) -> int:
    """Peak CPU tensor memory allocated while fn() runs (torch.profiler's per-op self allocations
    and frees, in time order), its result included."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("name,args", [("task_arithmetic", ()), ("ties", (0.3,)), ("dare_ties", (0.3,)),
                                       ("dare_linear", (0.3,)), ("magnitude_prune", (0.3,))])
def test_peak_memory_does_not_grow_with_the_task_count(name, args):
    """One pass with O(numel) accumulators: the peak is the same for 2 and 8 tasks, while PEFT's
    stacked temporaries grow with N (measured: PEFT 17-27 x the tensor's bytes at N = 8, ours 2-5.5)."""
    numel = 1 << 16
    peaks = {}
    for n in (2, 8):
        tasks, w = [torch.randn(numel) for _ in range(n)], _weights(n)
        peaks[n] = _peak_bytes(lambda: getattr(ours, name)(tasks, w, *args)) / (4 * numel)
        peaks["peft", n] = _peak_bytes(lambda: getattr(peft_mu, name)(tasks, w, *args)) / (4 * numel)
    assert peaks[8] <= peaks[2] + 0.25, peaks
    assert peaks[8] <= 6 and peaks["peft", 8] >= 2 * peaks[8], peaks
