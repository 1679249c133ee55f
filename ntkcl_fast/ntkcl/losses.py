"""NTK-CL's regularizers, each in two implementations selected by ``fused``.

``fused=True`` calls ntkcl_fast's ops (``l2_penalty``, ``projection_residual``,
``ntkcl_contrastive``, ``prototype_basis``); ``fused=False`` runs the same math written in
eager PyTorch, as NTK-CL's own code does (``ntkcl_fast.reference.ortho_eager``, the baselines of
the tests and benchmarks too). Both follow docs/API.md, so a training step gives the same loss
and gradients either way (tests/test_ntkcl.py checks it).
"""
from __future__ import annotations

import ntkcl_fast
from ntkcl_fast.reference import ortho_eager as eager

# the ntkcl_fast ops a fused step calls (the demo prints them)
FUSED_OPS = ("l2_penalty", "prototype_basis", "projection_residual", "ntkcl_contrastive")


def l2_penalty_eager(params, anchors, *, lam=1.0):
    total = sum(((p - a.to(p.dtype)) ** 2).sum() for p, a in zip(params, anchors))
    return lam * total


def prototype_basis(prototypes, rank, *, fused=True):
    return (ntkcl_fast.prototype_basis if fused else eager.prototype_basis)(prototypes, rank)


def projection_residual(features, basis, *, normalize=True, reduction="sum", fused=True):
    fn = ntkcl_fast.projection_residual if fused else eager.projection_residual
    return fn(features, basis, normalize=normalize, reduction=reduction)


def ntkcl_contrastive(features, labels, *, temperature=0.1, fused=True):
    fn = ntkcl_fast.ntkcl_contrastive if fused else eager.ntkcl_contrastive
    return fn(features, labels, temperature=temperature)


def l2_anchor(params, anchors, *, lam=1.0, fused=True):
    if fused:
        return ntkcl_fast.l2_penalty(list(params), list(anchors), lam=lam)
    return l2_penalty_eager(params, anchors, lam=lam)
