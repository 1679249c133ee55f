"""DAREx's q: darex_analytic_q against a transcription of DAREx's own loop, its edge cases and bad
inputs; darex_q_search's grid, NaN scores and fixed mask."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.darex import _phi

from ._darex_peer import darex_loop
from ._helpers import compiled

SHAPES = list(itertools.product([1, 7, 33], [1, 13, 257]))
SETTINGS = [(0.1, 0.45, 0.95), (0.9, 0.37, 0.95), (0.9, 1.0, 0.5), (0.99, 0.1, 0.95), (0.99, 0.45, 0.5)]


def _layer(rows, cols, seed, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scale).to(dtype)
    x = torch.randn(cols, generator=gen, dtype=torch.float64).to(dtype)
    return w, x


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("p,eta,gamma", SETTINGS)
def test_fp64_equals_darex_loop_in_fp64(rows, cols, p, eta, gamma):
    # unrounded arithmetic: the grid, the 1e4 start, ties, the global stop must all be DAREx's
    for seed, scale in ((0, 1.0), (1, 0.01)):
        w, x = _layer(rows, cols, seed, scale)
        got = ntkcl_fast.darex_analytic_q(w, x, p, eta=eta, gamma=gamma, resolution=torch.float64)
        want = darex_loop(p, w.double() * x.double(), eta, gamma, dtype=torch.float64)
        assert torch.equal(got, want), (seed, (got != want).sum())


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("p,eta,gamma", SETTINGS)
def test_fp32_equals_darex_loop_in_fp32_up_to_the_sums(rows, cols, p, eta, gamma):
    # every step rounded as torch's fp32 does; only the two sums accumulate in fp64
    for seed, scale in ((2, 1.0), (3, 0.01)):
        w, x = _layer(rows, cols, seed, scale)
        got = ntkcl_fast.darex_analytic_q(w, x, p, eta=eta, gamma=gamma, resolution=torch.float32)
        want = darex_loop(p, w * x, eta, gamma, dtype=torch.float32, fp64_sums=True)
        assert torch.equal(got, want), (seed, (got != want).sum())


def test_issue_example_every_row_gets_a_tenth():
    # p = 0.9, eta = 0.37 (DAREx's README value for CoLA) on fine-tuning-sized deltas: DAREx's fp16
    # loop ties at q = 0.1 on every row and stops there; the default fp16 resolution does the same
    w, x = _layer(96, 768, 4, scale=1e-3)
    x = x * 0.5
    got = ntkcl_fast.darex_analytic_q(w, x, 0.9, eta=0.37)
    theirs = darex_loop(0.9, w * x, 0.37, dtype=torch.float16)
    assert torch.equal(theirs, torch.full((96,), 0.1))
    assert torch.equal(got, theirs)
    # unrounded, the same objective keeps improving by 1e-6 steps: the stopping rule is about precision
    exact = ntkcl_fast.darex_analytic_q(w, x, 0.9, eta=0.37, resolution=torch.float64)
    assert torch.equal(exact, darex_loop(0.9, w.double() * x.double(), 0.37, dtype=torch.float64))
    assert not torch.equal(exact, got)


def test_bias_is_one_more_column():
    w, x = _layer(7, 13, 5)
    b = torch.randn(7, generator=torch.Generator().manual_seed(6))
    got = ntkcl_fast.darex_analytic_q(w, x, 0.9, bias_delta=b, resolution=torch.float64)
    c = torch.cat([w.double() * x.double(), b.double()[:, None]], dim=1)
    assert torch.equal(got, darex_loop(0.9, c, dtype=torch.float64))


def test_half_uses_phi_limit():
    # DAREx's phi(1/2) is 0/0: every row keeps 1 - p there; ours takes phi's limit 1/2
    w, x = _layer(7, 13, 7)
    c = w.double() * x.double()
    assert torch.equal(darex_loop(0.5, c, dtype=torch.float64, phi=float("nan")), torch.full((7,), 0.5))
    got = ntkcl_fast.darex_analytic_q(w, x, 0.5, resolution=torch.float64)
    assert torch.equal(got, darex_loop(0.5, c, dtype=torch.float64, phi=0.5))
    assert abs(_phi(0.5 + 1e-9) - 0.5) < 1e-8 and abs(_phi(0.5 - 1e-9) - 0.5) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_input_dtype(dtype):
    w, x = _layer(33, 257, 8, dtype=dtype)
    got = ntkcl_fast.darex_analytic_q(w, x, 0.9, resolution=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (33,)
    assert torch.equal(got, darex_loop(0.9, w.double() * x.double(), dtype=torch.float64))


@pytest.mark.parametrize("resolution", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [66, -70])
def test_huge_and_tiny_deltas_do_not_overflow(resolution, k):
    # deltas near 1e20 (2**66) and 1e-21 (2**-70), eta scaled back: the same objective bit for bit
    # when nothing overflows or underflows, which fp32 math would (c**2 > 3.4e38, eta**2 > 3.4e38)
    w, x = _layer(33, 257, 9)
    want = ntkcl_fast.darex_analytic_q(w, x, 0.9, eta=0.45, resolution=resolution)
    got = ntkcl_fast.darex_analytic_q(w * 2.0 ** k, x, 0.9, eta=0.45 * 2.0 ** -k, resolution=resolution)
    assert torch.equal(got, want)
    plain = ntkcl_fast.darex_analytic_q(w * 2.0 ** k, x, 0.9, resolution=resolution)
    assert torch.isfinite(plain).all() and (plain > 0).all()
    assert torch.equal(ntkcl_fast.darex_analytic_q(w * 2.0 ** k, x, 0.9, resolution=torch.float64),
                       darex_loop(0.9, (w * 2.0 ** k).double() * x.double(), dtype=torch.float64))


def test_grid_ends():
    w, x = _layer(7, 13, 10)
    # p <= 0.001: the grid int((1 - p) * 1000) .. 998 is empty, every row keeps 1 - p
    assert torch.equal(ntkcl_fast.darex_analytic_q(w, x, 0.0), torch.ones(7))
    assert torch.equal(ntkcl_fast.darex_analytic_q(w, x, 0.0005), torch.full((7,), 1 - 0.0005))
    # p > 0.999: DAREx starts at q = 0 and divides by it; the grid starts at 0.001
    # (with these deltas the objective stays above DAREx's 1e4 start there: every row keeps 1 - p;
    # with tiny ones it is flat, q = 0.001 improves on 1e4 and q = 0.002 ties, stopping every row)
    assert torch.equal(ntkcl_fast.darex_analytic_q(w, x, 0.9995), torch.full((7,), 1 - 0.9995))
    assert torch.equal(ntkcl_fast.darex_analytic_q(w * 1e-6, x, 0.9995), torch.full((7,), 0.002))
    assert torch.equal(ntkcl_fast.darex_analytic_q(w[:0], x, 0.9), torch.empty(0))


def test_stopping_rule_and_nan_rows():
    w, x = _layer(33, 13, 11)
    c = w.double() * x.double()
    for stop in (0.0, 0.5, 1.0, 2.0):  # 0 stops after the first q, above 1 scans the whole grid
        got = ntkcl_fast.darex_analytic_q(w, x, 0.9, stop_fraction=stop, resolution=torch.float64)
        assert torch.equal(got, darex_loop(0.9, c, stop_iter=stop, dtype=torch.float64)), stop
    w[3, 2] = float("nan")  # a NaN row neither improves nor stops, as in DAREx
    got = ntkcl_fast.darex_analytic_q(w, x, 0.9, resolution=torch.float64)
    assert got[3] == torch.tensor(0.1) and torch.equal(got, darex_loop(0.9, w.double() * x.double(),
                                                                       dtype=torch.float64))


def test_compiles_to_the_eager_result():
    # darex_q_search is a host loop around the caller's evaluation, nothing to trace; the
    # analytic q is tensor math and must compile like every other public function
    w, x = _layer(7, 5, 12)
    b = torch.randn(7, generator=torch.Generator().manual_seed(13))
    for resolution in (torch.float16, torch.float64):
        def fn(w, x, b):
            return ntkcl_fast.darex_analytic_q(w, x, 0.9, eta=0.5, gamma=0.9, bias_delta=b, resolution=resolution)
        assert torch.equal(compiled(fn)(w, x, b), fn(w, x, b))


def test_bad_inputs_name_the_argument():
    w, x = _layer(4, 3, 14)
    q = ntkcl_fast.darex_analytic_q
    with pytest.raises(TypeError, match="delta_weight"):
        q(w.to(torch.complex64), x, 0.9)
    with pytest.raises(TypeError, match="mean_input"):
        q(w, x.to(torch.complex64), 0.9)
    with pytest.raises(TypeError, match="bias_delta"):
        q(w, x, 0.9, bias_delta=torch.ones(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="mean_input"):
        q(w, x.to("meta"), 0.9)  # another device: refused, not moved
    with pytest.raises(ValueError, match="bias_delta"):
        q(w, x, 0.9, bias_delta=torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="mean_input"):
        q(w, torch.ones(4), 0.9)
    with pytest.raises(ValueError, match="delta_weight"):
        q(w[0], x, 0.9)
    for kw, name in (({"eta": -1.0}, "eta"), ({"gamma": 1.0}, "gamma"), ({"gamma": math.nan}, "gamma"),
                     ({"stop_fraction": math.nan}, "stop_fraction")):
        with pytest.raises(ValueError, match=name):
            q(w, x, 0.9, **kw)
    with pytest.raises(ValueError, match="p"):
        q(w, x, 1.0)
    with pytest.raises(TypeError, match="resolution"):
        q(w, x, 0.9, resolution=torch.int32)


def test_dare_refuses_a_q_that_underflows_fp32():
    f = torch.randn(6)
    b = torch.zeros(6)
    for bad in (1e-50, 1e-39):
        with pytest.raises(ValueError, match="q"):
            ntkcl_fast.dare(f, b, 0.5, q=bad)
    ntkcl_fast.dare(f, b, 0.5, q=torch.finfo(torch.float32).tiny)  # the smallest normal fp32 is a q


def test_q_search_same_mask_every_candidate():
    gen = torch.Generator().manual_seed(9)
    f, b = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    target = ntkcl_fast.dare(f, b, 0.8, q=0.3, seed=4)
    masks = []

    def evaluate(q):
        merged = ntkcl_fast.dare(f, b, 0.8, q=q, seed=4)
        masks.append(merged != b)
        return -float((merged - target).abs().sum())

    best, score = ntkcl_fast.darex_q_search(evaluate, p=0.8, coarse=[0.1, 0.2, 0.25, 0.4, 0.6])
    assert abs(best - 0.3) < 0.03 and score <= 0
    assert all(torch.equal(m, masks[0]) for m in masks)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 0.999])
def test_q_search_default_grid_reaches_ten_times_keep(p):
    tried = []

    def evaluate(q):
        tried.append(q)
        return -abs(q - 9 * (1 - p))  # best q at 9 (1 - p), capped

    best, _ = ntkcl_fast.darex_q_search(evaluate, p=p)
    assert max(tried) >= min(10 * (1 - p), 0.999) - 1e-12
    assert max(tried) < 1.0
    assert abs(best - min(9 * (1 - p), 0.999)) <= 0.1 * (1 - p)


def test_q_search_nan_never_wins():
    def first_nan(q):
        return math.nan if q == min(grid) else -abs(q - 0.3)

    grid = [0.1, 0.2, 0.3, 0.4]
    best, score = ntkcl_fast.darex_q_search(first_nan, p=0.9, coarse=grid, fine_steps=0)
    assert best == 0.3 and score == 0.0
    grid = [0.1, 0.2]
    best, score = ntkcl_fast.darex_q_search(lambda q: math.nan if q != 0.2 else -1.0, p=0.9, coarse=grid)
    assert best == 0.2 and score == -1.0  # the NaN fine points around it do not win either
    with pytest.raises(ValueError, match="NaN"):
        ntkcl_fast.darex_q_search(lambda q: math.nan, p=0.9)
