"""DAREx rescaling: the q of `dare(..., q=q)` found by search (`darex_q_search`) or in closed
form per row of a linear layer (`darex_analytic_q`)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _validate

__all__ = ["darex_analytic_q", "darex_q_search"]


def darex_q_search(evaluate: Callable[[float], float], *, p: float, coarse=None, fine_steps: int = 5,
                   maximize: bool = True) -> tuple[float, float]:
    """DAREx-q search: the q that scores best under the caller's `evaluate(q)`.

    As DAREx's own search: a coarse grid first, then a finer pass of `fine_steps` points on each
    side of the best coarse value, up to its grid neighbours. The default coarse grid is
    `(1 - p) * m` for m = 0.5, 0.6, ..., 2.0 (DAREx finds the best q a little above 1 - p at high
    p). `evaluate` should merge with a fixed `seed` (so the mask is the same for every candidate
    and only q changes) and return a score (e.g. validation accuracy; `maximize=False` for a
    loss). Each q is evaluated once. Returns (best q, its score).
    """
    p = _validate.unit_interval(p, "p")
    if not callable(evaluate):
        raise TypeError("evaluate must be callable q -> score")
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or fine_steps < 0:
        raise ValueError(f"fine_steps must be an int >= 0, got {fine_steps!r}")
    base_q = max(1.0 - p, 1e-6)
    if coarse is None:
        coarse = [base_q * (0.5 + 0.1 * m) for m in range(16)]
    grid = sorted({float(c) for c in coarse})
    if not grid or any(not (c > 0 and math.isfinite(c)) for c in grid):
        raise ValueError("coarse must be a non-empty sequence of finite floats > 0")
    sign = 1.0 if maximize else -1.0
    scores: dict[float, float] = {}

    def score(qv: float) -> float:
        if qv not in scores:
            scores[qv] = float(evaluate(qv))
        return scores[qv]

    best = max(grid, key=lambda c: sign * score(c))
    i = grid.index(best)
    lo = grid[i - 1] if i > 0 else best / 2
    hi = grid[i + 1] if i + 1 < len(grid) else best * 1.5
    fine = [best + (lo - best) * s / (fine_steps + 1) for s in range(1, fine_steps + 1)]
    fine += [best + (hi - best) * s / (fine_steps + 1) for s in range(1, fine_steps + 1)]
    for c in fine:
        if sign * score(c) > sign * score(best):
            best = c
    return best, scores[best]


def darex_analytic_q(delta_weight: torch.Tensor, mean_input: torch.Tensor, p: float, *, eta: float = 1.0,
                     gamma: float = 0.0) -> torch.Tensor:
    """DAREx's analytical per-row q for a linear layer `y = W x` with delta `dW [out, in]`.

    For row r, with the mean input activation `x_bar [in]` and the DARE mask m_i ~ Bernoulli(1 - p),
    the change of the row's output caused by pruning and rescaling by 1/q is
    `h_r = sum_i (1 - m_i / q) dW_ri x_bar_i`, with

        E[h_r]   = (1 - (1 - p) / q) * mu_r,     mu_r = sum_i dW_ri x_bar_i
        Var[h_r] = p (1 - p) / q^2 * s_r,        s_r  = sum_i (dW_ri x_bar_i)^2

    q_r minimizes `E[h_r]^2 + eta * Var[h_r]` (the bias-variance balance of DAREx-q; eta = 1 is the
    mean squared change), which in closed form is

        q_r = (1 - p) * (1 + eta * p / (1 - p) * s_r / (mu_r^2 + gamma)).

    `eta` >= 0 weighs the variance (eta = 0 gives plain DARE, q = 1 - p); `gamma` >= 0 damps rows
    whose mean output change mu_r is near zero (with gamma = 0 a row with mu_r = 0 gets 1 - p).
    q_r >= 1 - p always. Returns fp32 `q [out]`, to pass as `dare(..., q=q)`.
    """
    p = _validate.unit_interval(p, "p")
    if p >= 1.0:
        raise ValueError("p must be < 1 for an analytical q")
    if not isinstance(delta_weight, torch.Tensor) or delta_weight.dim() != 2:
        raise ValueError("delta_weight must be a 2-D tensor [out, in]")
    if not isinstance(mean_input, torch.Tensor) or mean_input.shape != (delta_weight.shape[1],):
        raise ValueError(f"mean_input must have shape ({delta_weight.shape[1]},), got "
                         f"{tuple(getattr(mean_input, 'shape', ()))}")
    for nm, v in (("eta", eta), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{nm} must be a finite float >= 0, got {v!r}")
    w = delta_weight.detach().float()
    x = mean_input.detach().float().to(w.device)
    contrib = w * x
    m = contrib.sum(1)
    s = (contrib * contrib).sum(1)
    keep = 1.0 - p
    ratio = s / (m * m + gamma) if gamma > 0 else torch.where(m != 0, s / (m * m), torch.zeros_like(s))
    return keep * (1.0 + eta * p / keep * ratio)
