"""DAREx's analytical q loop (`analytical_resolve_new`, utils/analyticalq.py of the DAREx
repository), transcribed step by step: one torch op per step of theirs, a Python loop over q.

`dtype` is the dtype the loop computes in (DAREx: fp16; the tests use fp32 and fp64).
`fp64_sums=True` accumulates the two sums in fp64 and rounds them to `dtype` once, the one
place where darex_analytic_q's arithmetic departs from DAREx's on purpose. `phi` overrides
phi(p) (DAREx's expression is 0/0 = NaN at p = 1/2).
"""
from __future__ import annotations

import math

import torch


def darex_loop(p: float, c: torch.Tensor, eta: float = 0.45, prob: float = 0.95, stop_iter: float = 0.8, *,
               dtype: torch.dtype = torch.float32, fp64_sums: bool = False, phi: float | None = None) -> torch.Tensor:
    c = c.to(dtype)
    if phi is None:
        phi = (1 - 2 * p) / math.log((1 - p) / p)
    if fp64_sums:
        sum_c = torch.sum(c.double(), dim=1, keepdim=True).to(dtype)
        sum_c2 = torch.sum((c ** 2).double(), dim=1, keepdim=True).to(dtype)
    else:
        sum_c = torch.sum(c, dim=1, keepdim=True)
        sum_c2 = torch.sum(c ** 2, dim=1, keepdim=True)
    q_o = torch.ones(c.shape[0], 1) * (1 - p)
    stop_index = torch.zeros(c.shape[0], 1)
    best_res = torch.ones_like(q_o, dtype=dtype) * 10000
    for q_100 in range(int((1 - p) * 1000), 999):
        q = q_100 * 0.001
        term1 = (1 - (1 - p) / q) * sum_c
        term2 = eta ** 2 * phi * sum_c2 / (4 * q ** 2) + math.log(2 / (1 - prob))
        res = abs(eta * term1 + term2)
        index_s = res <= best_res
        index_l = res >= best_res
        best_res[index_s] = res[index_s]
        q_o[index_s] = q
        stop_index[index_l] = 1
        if stop_index.mean() >= stop_iter:
            break
    return q_o[:, 0]
