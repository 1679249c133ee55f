"""DARE / DAREx in plain PyTorch (+ NumPy Philox): the executable spec and the test oracle.

Keep rule (docs/API.md): flat element i of a tensor with key k under seed s is kept iff
u(i) >= T(p), u from Philox4x32-10 (ntkcl_fast.random), T(p) = min(floor(p * 2**32), 2**32).
"""
from __future__ import annotations

import numpy as np
import torch

from ..random import philox_uint32, threshold


def keep_mask(shape, p: float, seed: int, key: int, device=None) -> torch.Tensor:
    """BoolTensor of `shape`, True where the element is kept (seed and key already in [0, 2**64))."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    t = threshold(p)
    if t == 0:
        keep = np.ones(n, dtype=bool)
    elif t >= 1 << 32:
        keep = np.zeros(n, dtype=bool)
    else:
        keep = philox_uint32(np.arange(n, dtype=np.uint64), key, seed) >= np.uint32(t)
    return torch.from_numpy(keep).reshape(shape).to(device)


def _scale_shape(q: torch.Tensor, ndim: int) -> torch.Tensor:
    return q.reshape((-1,) + (1,) * (ndim - 1))


def dare(finetuned: torch.Tensor, base: torch.Tensor, p: float, q, seed: int, key: int) -> torch.Tensor:
    """base + keep * (finetuned - base) / q in fp32 (fp64 for fp64 inputs), rounded once.

    `q` is a float > 0 or a per-row 1-D tensor; p == 1 gives base (no division by 0).
    """
    acc = torch.float64 if finetuned.dtype == torch.float64 else torch.float32
    keep = keep_mask(finetuned.shape, p, seed, key, finetuned.device)
    f, b = finetuned.to(acc), base.to(acc)
    if isinstance(q, torch.Tensor):
        q = _scale_shape(q.to(finetuned.device, acc), finetuned.dim())
    delta = torch.where(keep, (f - b) / q, torch.zeros((), dtype=acc, device=f.device))
    return (b + delta).to(finetuned.dtype)


def dare_delta(delta: torch.Tensor, p: float, q, seed: int, key: int) -> torch.Tensor:
    """keep * delta / q (same keep rule), as a new tensor."""
    acc = torch.float64 if delta.dtype == torch.float64 else torch.float32
    keep = keep_mask(delta.shape, p, seed, key, delta.device)
    d = delta.to(acc)
    if isinstance(q, torch.Tensor):
        q = _scale_shape(q.to(delta.device, acc), delta.dim())
    return torch.where(keep, d / q, torch.zeros((), dtype=acc, device=d.device)).to(delta.dtype)


def magnitude_keep(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Flat BoolTensor keeping exactly the k entries of largest |delta|; ties go to lower indices."""
    flat = delta.detach().reshape(-1).abs()
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    kth = torch.kthvalue(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, n - k + 1).values
    kth = kth.to(flat.dtype)
    greater = flat > kth
    ties = flat == kth
    room = k - int(greater.sum())
    tie_rank = torch.cumsum(ties.to(torch.int64), 0)  # 1-based rank of each tie in index order
    return greater | (ties & (tie_rank <= room))
