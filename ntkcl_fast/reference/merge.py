"""Model merging of one tensor in plain PyTorch: the executable spec of `merge_tensors` (API.md,
"Model merging") and the test oracle. It stacks the N models (N x numel temporaries), which the
fused kernels must not; mergekit's `generalized_task_arithmetic` computes the same formulas.
"""
from __future__ import annotations

import torch

from .dare import keep_mask, magnitude_keep

M64 = (1 << 64) - 1
CONSENSUS = ("ties", "dare_ties")


def _sparsify(delta: torch.Tensor, method: str, density: float, rescale: str, seed: int, key: int) -> torch.Tensor:
    """The sparsified delta t_i of one model (acc dtype)."""
    if method == "ties":
        if density >= 1:
            return delta
        k = int(density * delta.numel())  # floor for density >= 0
        keep = magnitude_keep(delta, k).reshape(delta.shape)
        return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if method in ("dare_linear", "dare_ties"):
        keep = keep_mask(delta.shape, 1.0 - density, seed, key, delta.device)
        kept = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
        if rescale == "density":
            return kept / density if density > 0 else kept
        if rescale == "l1":
            full, part = delta.abs().sum(), kept.abs().sum()
            ok = (full >= 1e-7) & (part >= 1e-7)
            return kept * torch.where(ok, full / torch.where(ok, part, 1.0), 1.0)
        return kept
    return delta


def merge_tensors(base, models, method: str, weights, densities, lam: float, normalize: bool, rescale: str,
                  seed: int, key: int) -> torch.Tensor:
    """`weights`, `densities`: one float per model; arguments already checked."""
    like = base if base is not None else models[0]
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    ms = [m.to(acc) for m in models]
    w = torch.tensor(weights, dtype=acc, device=like.device).reshape((-1,) + (1,) * like.dim())
    if method == "linear":
        mixed = (torch.stack(ms) * w).sum(0)
        if normalize:
            div = w.sum(0)
            mixed = mixed / torch.where(div.abs() < 1e-8, 1.0, div)
        return mixed.to(like.dtype)
    b = base.to(acc)
    t = torch.stack([_sparsify(m - b, method, r, rescale, seed, (key + i) & M64)
                     for i, (m, r) in enumerate(zip(ms, densities))])
    e = t * w
    if method in CONSENSUS:
        s = torch.where(e.sum(0) >= 0, 1.0, -1.0).to(acc)
        part = e.sign() == s
    else:
        part = torch.ones_like(e, dtype=torch.bool)
    mixed = torch.where(part, e, 0.0).sum(0)
    if normalize:
        div = torch.where(part, w.expand_as(e), 0.0).sum(0)
        div = torch.where(div == 0, 1.0, div) if method in CONSENSUS else torch.where(div.abs() < 1e-8, 1.0, div)
        mixed = mixed / div
    return (b + lam * mixed).to(like.dtype)
