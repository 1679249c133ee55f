"""Orthogonality penalties and NTK-CL's feature losses, written for clarity.

Every function here is differentiable through autograd and is the oracle of the fused
backends. Math runs in fp32 (fp64 when an input is fp64); the value is a 0-d tensor of that
math dtype.

Zero-norm rows: normalization is `x / max(||x||, EPS)` with EPS = 1e-12 (what
`torch.nn.functional.normalize` does), so an all-zero row stays zero and its cosines are 0;
nothing is NaN, and the gradient reaching such a row is the upstream gradient divided by EPS
(the derivative of `x / EPS`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1, eps=EPS)


def feature_orthogonality(features, prototypes, normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """mean (over B*K) or sum of the squared cosine (dot when not `normalize`) of every row pair."""
    acc = math_dtype(features.dtype, prototypes.dtype)
    f, p = features.to(acc), prototypes.to(acc)
    if normalize:
        f, p = normalize_rows(f), normalize_rows(p)
    s = f @ p.T
    total = (s * s).sum()
    if reduction == "mean":
        total = total / max(s.numel(), 1)
    return total


@torch.no_grad()
def prototype_basis(prototypes, rank: int) -> torch.Tensor:
    """NTK-CL's basis of old-class prototypes: `U[:, :rank]` of the SVD of the column-normalized
    `prototypes.T` (full_matrices=True, as NTK-CL), in fp32 (fp64 for fp64 input)."""
    acc = math_dtype(prototypes.dtype)
    u, _, _ = torch.linalg.svd(F.normalize(prototypes.to(acc).T, dim=0), full_matrices=True)
    return u[:, :rank].contiguous()


def projection_residual(features, basis, normalize: bool = True, reduction: str = "sum") -> torch.Tensor:
    """`r = f - f @ basis @ basis.T`; `r.sum()` (NTK-CL's signed sum) or `(r ** 2).sum()`."""
    acc = math_dtype(features.dtype, basis.dtype)
    f, u = features.to(acc), basis.to(acc)
    if normalize:
        f = normalize_rows(f)
    r = f - (f @ u) @ u.T
    return r.sum() if reduction == "sum" else (r * r).sum()


def gram_orthogonality(weights, reduction: str = "mean") -> torch.Tensor:
    """sum over the list of mean (or sum) of `(W @ W.T - I) ** 2` (CODA-Prompt's penalty)."""
    acc = math_dtype(*[w.dtype for w in weights])
    total = torch.zeros((), dtype=acc, device=weights[0].device if weights else "cpu")
    for w in weights:
        w = w.to(acc)
        g = w @ w.T - torch.eye(w.shape[0], dtype=acc, device=w.device)
        term = (g * g).sum()
        if reduction == "mean":
            term = term / max(g.numel(), 1)
        total = total + term
    return total


def cross_orthogonality(old, new, norm: str = "l1") -> torch.Tensor:
    """sum over layers of `|old_l @ new_l.T|.sum()` (O-LoRA) or `((old_l @ new_l.T) ** 2).sum()`."""
    acc = math_dtype(*[t.dtype for t in list(old) + list(new)])
    total = torch.zeros((), dtype=acc, device=old[0].device if old else "cpu")
    for a, b in zip(old, new):
        p = a.to(acc) @ b.to(acc).T
        total = total + (p.abs().sum() if norm == "l1" else (p * p).sum())
    return total


def ntkcl_contrastive(features, labels, temperature: float = 0.1) -> torch.Tensor:
    """NTK-CL's mutual-information term, with `S = norm(f) @ norm(f).T / t`:

    `-log(sum_{i != j, y_i == y_j} exp(S_ij)) + mean_i logsumexp_{j != i} S_ij`,

    both sums taken as stable log-sum-exps. `+inf` when no two rows share a label (NTK-CL's own
    code takes the log of an empty sum); the gradient is then zero.
    """
    acc = math_dtype(features.dtype)
    f = normalize_rows(features.to(acc))
    n = f.shape[0]
    s = (f @ f.T) / temperature
    off_diag = ~torch.eye(n, dtype=torch.bool, device=f.device)
    positive = (labels[:, None] == labels[None, :]) & off_diag
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=f.device)
    pos_term = -torch.logsumexp(torch.where(positive, s, neg_inf).reshape(-1), dim=0)
    row_term = torch.logsumexp(torch.where(off_diag, s, neg_inf), dim=1).mean()
    # A where, not a Python branch on the data (which torch.compile cannot trace): without a
    # positive pair the sum is +inf + finite (or -inf for N = 1, NaN) and is replaced by +inf; the
    # gradient is zero, since the NaN the empty log-sum-exps give in their backward lands only on
    # entries the masks drop.
    return torch.where(positive.any(), pos_term + row_term, torch.tensor(float("inf"), dtype=acc, device=f.device))
