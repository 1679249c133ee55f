"""NTK-CL's regularizers, each in two implementations selected by ``fused``.

``fused=True`` calls ntkcl_fast's ops (``l2_penalty``, ``projection_residual``,
``ntkcl_contrastive``, ``prototype_basis``); ``fused=False`` runs the same math written in
eager PyTorch, as NTK-CL's own code does. Both follow docs/API.md, so a training step gives the
same loss and gradients either way (tests/test_ntkcl.py checks it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ntkcl_fast


def _op(name: str):
    """The ntkcl_fast op `name`, or None when this build does not have it yet."""
    return getattr(ntkcl_fast, name, None)


def fused_ops_available() -> dict[str, bool]:
    return {n: _op(n) is not None for n in ("l2_penalty", "prototype_basis", "projection_residual",
                                            "ntkcl_contrastive")}


# ---------------------------------------------------------------- eager PyTorch versions

def prototype_basis_eager(prototypes: torch.Tensor, rank: int) -> torch.Tensor:
    u = torch.linalg.svd(F.normalize(prototypes.T, dim=0), full_matrices=True)[0]
    return u[:, :rank]


def projection_residual_eager(features, basis, *, normalize=True, reduction="sum"):
    f = F.normalize(features, dim=-1) if normalize else features
    r = f - f @ basis @ basis.T
    return r.sum() if reduction == "sum" else (r ** 2).sum()


def ntkcl_contrastive_eager(features, labels, *, temperature=0.1):
    n = features.shape[0]
    f = F.normalize(features, dim=1)
    s = f @ f.T / temperature
    off = ~torch.eye(n, dtype=torch.bool, device=features.device)
    pos = (labels[:, None] == labels[None, :]) & off
    neg_inf = torch.full_like(s, float("-inf"))
    # -log(sum(exp(S_pos))) of the official code, as a log-sum-exp over the masked matrix (same value;
    # +inf for no positive pair). The value is a difference of two terms of size ~1/t, so the masked
    # full-matrix form is kept: it rounds like the fused op and the comparison measures the op, not
    # the summation order.
    positive = -torch.logsumexp(torch.where(pos, s, neg_inf).reshape(-1), dim=0)
    negative = torch.logsumexp(torch.where(off, s, neg_inf), dim=1).mean()
    return positive + negative


def l2_penalty_eager(params, anchors, *, lam=1.0):
    total = sum(((p - a.to(p.dtype)) ** 2).sum() for p, a in zip(params, anchors))
    return lam * total


# ---------------------------------------------------------------- switch

def prototype_basis(prototypes, rank, *, fused=True):
    op = _op("prototype_basis") if fused else None
    return op(prototypes, rank) if op is not None else prototype_basis_eager(prototypes, rank)


def projection_residual(features, basis, *, normalize=True, reduction="sum", fused=True):
    op = _op("projection_residual") if fused else None
    if op is not None:
        return op(features, basis, normalize=normalize, reduction=reduction)
    return projection_residual_eager(features, basis, normalize=normalize, reduction=reduction)


def ntkcl_contrastive(features, labels, *, temperature=0.1, fused=True):
    op = _op("ntkcl_contrastive") if fused else None
    if op is not None:
        return op(features, labels, temperature=temperature)
    return ntkcl_contrastive_eager(features, labels, temperature=temperature)


def l2_anchor(params, anchors, *, lam=1.0, fused=True):
    if fused:
        return ntkcl_fast.l2_penalty(list(params), list(anchors), lam=lam)
    return l2_penalty_eager(params, anchors, lam=lam)
