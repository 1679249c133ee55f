"""DARE / DAREx in plain PyTorch (Philox in torch integer ops): the executable spec and the test oracle.

Keep rule (docs/API.md): flat element i of a tensor with key k under seed s is kept iff
u(i) >= T(p), u from Philox4x32-10 (ntkcl_fast.random), T(p) = min(floor(p * 2**32), 2**32).
"""
from __future__ import annotations

import math

import torch

from ..random import philox_words, threshold


def keep_mask(shape, p: float, seed: int, key: int, device=None, offset: int = 0) -> torch.Tensor:
    """BoolTensor of `shape`, True where the element is kept (seed and key already in [0, 2**64));
    flat element i is the keep rule's element offset + i (a shard's place in the whole tensor)."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    t = threshold(p)
    if t == 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if t >= 1 << 32:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    counters = torch.arange(offset // 4, (offset + n + 3) // 4, dtype=torch.int64, device=device)
    u = philox_words(counters, key, seed).reshape(-1)[offset % 4:offset % 4 + n]
    return (u >= t).reshape(shape)


def _scale_shape(q: torch.Tensor, ndim: int) -> torch.Tensor:
    return q.reshape((-1,) + (1,) * (ndim - 1))


def dare(finetuned: torch.Tensor, base: torch.Tensor, p: float, q, seed: int, key: int,
         offset: int = 0) -> torch.Tensor:
    """base + keep * (finetuned - base) / q in fp32 (fp64 for fp64 inputs), rounded once.

    `q` is a float > 0 or a per-row 1-D tensor; p == 1 gives base (no division by 0).
    """
    acc = torch.float64 if finetuned.dtype == torch.float64 else torch.float32
    keep = keep_mask(finetuned.shape, p, seed, key, finetuned.device, offset)
    f, b = finetuned.to(acc), base.to(acc)
    if isinstance(q, torch.Tensor):
        q = _scale_shape(q.to(finetuned.device, acc), finetuned.dim())
    delta = torch.where(keep, (f - b) / q, torch.zeros((), dtype=acc, device=f.device))
    return (b + delta).to(finetuned.dtype)


def dare_delta(delta: torch.Tensor, p: float, q, seed: int, key: int, offset: int = 0) -> torch.Tensor:
    """keep * delta / q (same keep rule), as a new tensor."""
    acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
    keep = keep_mask(delta.shape, p, seed, key, delta.device, offset)
    d = delta.to(acc)
    if isinstance(q, torch.Tensor):
        q = _scale_shape(q.to(delta.device, acc), delta.dim())
    return torch.where(keep, d / q, torch.zeros((), dtype=acc, device=d.device)).to(delta.dtype)


L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: a norm below it leaves the kept entries unscaled


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept * ||delta||_1 / ||kept||_1` (mergekit >= 0.1's DARE rescale), `kept` unscaled when
    either norm is below L1_EPS; a 0-d scale, so no host sync."""
    before, after = delta.abs().sum(), kept.abs().sum()
    unscaled = (before < L1_EPS) | (after < L1_EPS)
    return kept * torch.where(unscaled, torch.ones_like(before), before / after)


def magnitude_keep(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Flat BoolTensor keeping exactly the k entries of largest |delta|; ties go to lower indices
    and NaN ranks above every number (a stable descending sort)."""
    flat = delta.detach().reshape(-1).abs()
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=delta.device)
    return keep.index_fill_(0, order[:k], True)
