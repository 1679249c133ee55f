"""The orthogonality losses as people write them in eager PyTorch (the anchor projects' code).

These are the baselines of the tests' error budget (run in the inputs' dtype, their error is
what PyTorch itself achieves), of the benchmark rows (column `eager`) and of
`ntkcl_fast.ntkcl.losses` with `fused=False`. The oracle is `reference/ortho.py`, which runs in
fp32/fp64 whatever the inputs' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_orthogonality(features, prototypes, *, normalize=True, reduction="mean"):
    f, p = (F.normalize(features, dim=1), F.normalize(prototypes, dim=1)) if normalize else (features, prototypes)
    s = f @ p.T
    return (s ** 2).mean() if reduction == "mean" else (s ** 2).sum()


def prototype_basis(prototypes, rank):  # NTK-CL
    u = torch.linalg.svd(F.normalize(prototypes.T, dim=0), full_matrices=True)[0]
    return u[:, :rank]


def projection_residual(features, basis, *, normalize=True, reduction="sum"):  # NTK-CL: the signed sum
    f = F.normalize(features, dim=1) if normalize else features
    r = f - f @ basis @ basis.T
    return r.sum() if reduction == "sum" else (r ** 2).sum()


def gram_orthogonality(weights, *, reduction="mean"):  # CODA-Prompt's ortho_penalty
    total = 0
    for w in weights:
        g = w @ w.T - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        total = total + ((g ** 2).mean() if reduction == "mean" else (g ** 2).sum())
    return total


def cross_orthogonality(old, new, *, norm="l1"):  # O-LoRA: sum of |A_old A_new^T|
    total = 0
    for a, b in zip(old, new):
        p = a @ b.T
        total = total + (p.abs().sum() if norm == "l1" else (p ** 2).sum())
    return total


def ntkcl_contrastive(features, labels, *, temperature=0.1):
    f = F.normalize(features, dim=1)
    n = f.shape[0]
    s = f @ f.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    # -log(sum(exp(S_pos))) of NTK-CL's code as a log-sum-exp over the masked matrix: the same value
    # (+inf for no positive pair) without overflow at t = 0.01
    return (-torch.logsumexp(torch.where(pos, s, ninf).reshape(-1), 0)
            + torch.logsumexp(torch.where(eye, ninf, s), 1).mean())
