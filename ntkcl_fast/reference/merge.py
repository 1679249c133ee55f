"""Model merging of one tensor in plain PyTorch: the executable spec of `merge_tensors` (API.md,
"Model merging") and the test oracle. mergekit's `generalized_task_arithmetic` computes the same
formulas; the sums over models here are explicit left folds in model order (from +0), the order
the fused kernels use, so elementwise results are bit-identical to theirs. Each model's sparsified
delta is a full numel temporary, which the fused kernels avoid.
"""
from __future__ import annotations

import torch

from ..random import M64
from .dare import keep_mask, l1_rescaled, magnitude_keep

CONSENSUS = ("ties", "dare_ties")


def _sparsify(delta: torch.Tensor, method: str, density: float, rescale: str, seed: int, key: int,
              offset: int) -> torch.Tensor:
    """The sparsified delta t_i of one model (acc dtype); DARE draws element j as global offset + j."""
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    if method == "ties":
        if density >= 1:
            return delta
        k = int(density * delta.numel())  # floor for density >= 0
        keep = magnitude_keep(delta, k).reshape(delta.shape)
        return torch.where(keep, delta, zero)
    if method in ("dare_linear", "dare_ties"):
        keep = keep_mask(delta.shape, 1.0 - density, seed, key, delta.device, offset=offset)
        kept = torch.where(keep, delta, zero)
        if rescale == "density":
            return kept / density if density > 0 else kept
        if rescale == "l1":
            return l1_rescaled(delta, kept)
        return kept
    return delta


def _fold(terms, like: torch.Tensor) -> torch.Tensor:
    """+0 + terms[0] + terms[1] + ... in that order."""
    total = torch.zeros_like(like)
    for t in terms:
        total = total + t
    return total


def merge_tensors(base, models, method: str, weights, densities, lam: float, normalize: bool, rescale: str,
                  seed: int, key: int, offset: int = 0) -> torch.Tensor:
    """`weights`, `densities`: one float per model; arguments already checked."""
    like = base if base is not None else models[0]
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    ms = [m.to(acc) for m in models]
    w = [torch.tensor(x, dtype=acc, device=like.device) for x in weights]  # rounded to acc once
    one = torch.ones((), dtype=acc, device=like.device)
    zero = torch.zeros((), dtype=acc, device=like.device)
    if method == "linear":
        mixed = _fold([m * wi for m, wi in zip(ms, w)], ms[0])
        if normalize:
            div = _fold(w, one)
            mixed = mixed / torch.where(div.abs() < 1e-8, one, div)
        return mixed.to(like.dtype)
    b = base.to(acc)
    e = [_sparsify(m - b, method, r, rescale, seed, (key + i) & M64, offset) * wi
         for i, (m, r, wi) in enumerate(zip(ms, densities, w))]
    if method in CONSENSUS:
        positive = _fold(e, b) >= 0
        part = [torch.where(positive, ei > 0, ei < 0) for ei in e]  # zeros and NaN never take part
    else:
        part = [torch.ones_like(b, dtype=torch.bool)] * len(e)
    mixed = _fold([torch.where(p, ei, zero) for p, ei in zip(part, e)], b)
    if normalize:
        div = _fold([torch.where(p, wi, zero) for p, wi in zip(part, w)], b)
        div = torch.where(div == 0, one, div) if method in CONSENSUS else torch.where(div.abs() < 1e-8, one, div)
        mixed = mixed / div
    return (b + torch.tensor(lam, dtype=acc, device=b.device) * mixed).to(like.dtype)
