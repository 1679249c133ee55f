"""DAREx rescaling: the q of `dare(..., q=q)` found by search (`darex_q_search`) or, per row of a
linear layer, by DAREx's analytical scan (`darex_analytic_q`)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _validate

__all__ = ["darex_analytic_q", "darex_q_search"]

_Q_CAP = 0.999  # the default search grid stays below q = 1 (q > 1 would shrink the kept deltas)
_DEFAULT_MULTIPLES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def darex_q_search(evaluate: Callable[[float], float], *, p: float, coarse=None, fine_steps: int = 5,
                   maximize: bool = True) -> tuple[float, float]:
    """DAREx-q search: the q that scores best under the caller's `evaluate(q)`.

    As DAREx's own search: a coarse grid first, then a finer pass of `fine_steps` points on each
    side of the best coarse value, up to its grid neighbours. The default coarse grid is
    `(1 - p) * m` for m = 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, each capped at 0.999:
    at high p the best q is often several times 1 - p (DAREx's own scripts search 0.1 .. 0.5 at
    p = 0.99). `evaluate` should merge with a fixed `seed` (so the mask is the same for every
    candidate and only q changes) and return a score (e.g. validation accuracy; `maximize=False`
    for a loss). Each q is evaluated once. A NaN score never wins; ValueError when every score is
    NaN. Returns (best q, its score).
    """
    p = _validate.unit_interval(p, "p")
    if not callable(evaluate):
        raise TypeError("evaluate must be callable q -> score")
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or fine_steps < 0:
        raise ValueError(f"fine_steps must be an int >= 0, got {fine_steps!r}")
    top = math.inf
    if coarse is None:
        base_q = max(1.0 - p, 1e-6)
        top = _Q_CAP
        coarse = [min(base_q * m, top) for m in _DEFAULT_MULTIPLES]
    grid = sorted({float(c) for c in coarse})
    if not grid or any(not (c > 0 and math.isfinite(c)) for c in grid):
        raise ValueError("coarse must be a non-empty sequence of finite floats > 0")
    sign = 1.0 if maximize else -1.0
    scores: dict[float, float] = {}

    def rank(qv: float) -> tuple[bool, float]:
        """Larger is better; a NaN score ranks below every number, -inf included."""
        if qv not in scores:
            scores[qv] = float(evaluate(qv))
        s = scores[qv]
        return (False, 0.0) if s != s else (True, sign * s)

    best = max(grid, key=rank)  # the first of equal ranks wins
    if not rank(best)[0]:
        raise ValueError("evaluate returned NaN for every coarse q; no q can be chosen")
    i = grid.index(best)
    lo = grid[i - 1] if i > 0 else best / 2
    hi = grid[i + 1] if i + 1 < len(grid) else min(best * 1.5, top)
    fine = [best + (lo - best) * s / (fine_steps + 1) for s in range(1, fine_steps + 1)]
    fine += [best + (hi - best) * s / (fine_steps + 1) for s in range(1, fine_steps + 1) if hi > best]
    for c in fine:
        if rank(c) > rank(best):
            best = c
    return best, scores[best]


# DAREx's analytical q (`analytical_resolve_new` in the DAREx repository, utils/analyticalq.py)
_GRID_LAST = 998    # DAREx scans q = 0.001 * n for n = int((1 - p) * 1000) .. 998
_START_BEST = 1e4   # DAREx's initial best objective: a row above it at every q keeps 1 - p


def _phi(p: float) -> float:
    """(1 - 2p) / log((1 - p) / p), with its limit 1/2 at p = 1/2 (DAREx's numpy gives 0/0 = NaN).

    Near 1/2 both sides vanish; log1p of (1 - 2p) / p (exact there) keeps the digits that
    log((1 - p) / p) loses. Elsewhere DAREx's own expression."""
    if p == 0.5:
        return 0.5
    if 0.25 <= p <= 0.75:
        return (1.0 - 2.0 * p) / math.log1p((1.0 - 2.0 * p) / p)
    return (1.0 - 2.0 * p) / math.log((1.0 - p) / p)


def _check_tensor(t, name: str, shape: tuple[int, ...] | None, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _validate.FLOATING:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
    if shape is None and t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, in], got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of delta_weight), got {t.device}")


def _round_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x (fp64) rounded to `bits` significant bits, to nearest even, keeping fp64's exponent range."""
    mant, exp = torch.frexp(x)
    return torch.ldexp(torch.round(torch.ldexp(mant, torch.full_like(exp, bits))), exp - bits)


def _objective(c: torch.Tensor, q: torch.Tensor, p: float, eta: float, gamma: float,
               resolution: torch.dtype) -> torch.Tensor:
    """|objective| [rows, grid] step by step as DAREx's loop computes it in `resolution`.

    DAREx: c = fp16(c); term1 = (1 - (1 - p) / q) * sum(c); term2 = eta^2 phi(p) * sum(c^2) / (4 q^2)
    + log(2 / (1 - gamma)); res = |eta * term1 + term2|, every factor but the sums a Python float.
    Torch computes a step of a narrower tensor with a Python scalar in fp32 (the scalar rounded to
    fp32) and stores the result in the tensor's dtype; an fp64 result of one +, -, *, / rounded to
    24 bits is exactly that fp32 result (53 >= 2 * 24 + 2), so each step here is fp64 math rounded
    to 24 bits, then to `resolution`. The rounding keeps fp64's exponent range: nothing overflows
    or underflows where fp16 would. The two sums accumulate in fp64 (DAREx: in fp32)."""
    bits = 1 - round(math.log2(torch.finfo(resolution).eps))
    if bits >= 53:
        def fl(x):
            return x
        to_fp32 = fl
    else:
        def to_fp32(x):
            return _round_bits(x, 24)

        def fl(x):
            x = _round_bits(x, 24)
            return x if bits == 24 else _round_bits(x, bits)
    one = torch.ones((), dtype=torch.float64, device=c.device)
    c = fl(c)
    s1 = fl(c.sum(1))[:, None]
    s2 = fl(fl(c * c).sum(1))[:, None]
    term1 = fl(to_fp32(1.0 - (1.0 - p) / q) * s1)
    term2 = fl(to_fp32(one * (eta ** 2 * _phi(p))) * s2)
    term2 = fl(term2 / to_fp32(4.0 * (q * q)))
    term2 = fl(term2 + to_fp32(one * math.log(2.0 / (1.0 - gamma))))
    return fl(fl(to_fp32(one * eta) * term1) + term2).abs()


def _scan(res: torch.Tensor, stop_fraction: float) -> torch.Tensor:
    """Index into the grid of each row's q under DAREx's loop, -1 for a row that never improved.

    DAREx walks q upward keeping a best objective per row (starting at 1e4): `res <= best` moves
    the row's q there (a later q wins ties), `res >= best` marks the row stopped for good (a tie
    does both), and the walk ends after the first q at which stop_fraction of the rows are marked.
    Stopped rows still move when a later q improves on their best. NaN does neither."""
    rows, grid = res.shape
    nan_free = torch.where(torch.isnan(res), math.inf, res)
    best_after = torch.cummin(nan_free, dim=1).values.clamp(max=_START_BEST)
    best_before = torch.cat([torch.full_like(res[:, :1], _START_BEST), best_after[:, :-1]], dim=1)
    improved = res <= best_before
    stopped = torch.cumsum((res >= best_before).to(torch.int32), dim=1) > 0
    ends = stopped.sum(0).to(torch.float64) / rows >= stop_fraction
    last = torch.where(ends.any(), ends.to(torch.int32).argmax(), grid - 1)
    steps = torch.arange(grid, device=res.device)
    taken = improved & (steps <= last)
    return torch.where(taken, steps, -1).amax(1)


def darex_analytic_q(delta_weight: torch.Tensor, mean_input: torch.Tensor, p: float, *, eta: float = 0.45,
                     gamma: float = 0.95, stop_fraction: float = 0.8,
                     bias_delta: torch.Tensor | None = None, resolution: torch.dtype = torch.float16) -> torch.Tensor:
    """DAREx's analytical per-row q for a linear layer `y = W x + b` with deltas `dW [rows, in]`, `db`.

    With `c = dW * x_bar` (x_bar the mean input activation; `db` appended as one more column when
    `bias_delta` is given), each row's q is searched on `q = 0.001 * n`,
    `n = int((1 - p) * 1000) .. 998`, scanning upward, minimizing

        |eta (1 - (1 - p) / q) sum(c) + eta^2 phi(p) sum(c^2) / (4 q^2) + log(2 / (1 - gamma))|,

    `phi(x) = (1 - 2x) / log((1 - x) / x)`, as DAREx's `analytical_resolve_new` does, stopping rule
    and all (`_scan`); `eta` balances the two terms, `gamma` is the probability of the bound,
    `stop_fraction` ends the scan once that share of rows has stopped improving (above 1: never).

    Which q values tie decides where rows stop, so the arithmetic is part of the result: each step
    of the objective is rounded as torch rounds it in `resolution` (DAREx computes in fp16, the
    default; torch.float64 leaves it unrounded), without that dtype's range, and the two sums
    accumulate in fp64. Further differences (docs/DARE.md): phi(1/2) = 1/2 (DAREx: NaN, every row
    kept 1 - p); for p > 0.999 the grid starts at 0.001 (DAREx divides by q = 0); for p <= 0.001
    the grid is empty and every row gets 1 - p. Returns fp32 `q [rows]` on delta_weight's device,
    for `dare(..., q=q)` (DAREx itself applies the mean over rows).
    """
    p = _validate.unit_interval(p, "p")
    if p == 1.0:
        raise ValueError("p must be < 1: with every delta dropped there is no q to choose")
    eta = _validate.finite_float(eta, "eta", nonnegative=True)
    gamma = _validate.finite_float(gamma, "gamma", nonnegative=True)
    if gamma >= 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    stop_fraction = _validate.finite_float(stop_fraction, "stop_fraction", nonnegative=True)
    if resolution not in _validate.FLOATING:
        raise TypeError(f"resolution must be torch.float16, bfloat16, float32 or float64, got {resolution!r}")
    _check_tensor(delta_weight, "delta_weight", None, None)
    rows, cols = delta_weight.shape
    device = delta_weight.device
    _check_tensor(mean_input, "mean_input", (cols,), device)
    if bias_delta is not None:
        _check_tensor(bias_delta, "bias_delta", (rows,), device)
    keep = 1.0 - p
    first = max(int(keep * 1000), 1)
    if first > _GRID_LAST or rows == 0:
        return torch.full((rows,), keep, dtype=torch.float32, device=device)
    c = delta_weight.detach().double() * mean_input.detach().double()
    if bias_delta is not None:
        c = torch.cat([c, bias_delta.detach().double()[:, None]], dim=1)
    q = torch.arange(first, _GRID_LAST + 1, dtype=torch.float64, device=device) * 0.001
    res = _objective(c, q, p, eta, gamma, resolution)
    index = _scan(res, stop_fraction)
    chosen = torch.where(index >= 0, q[index.clamp(min=0)], keep)
    return chosen.to(torch.float32)
