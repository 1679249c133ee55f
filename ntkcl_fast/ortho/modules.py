"""`nn.Module` forms of the orthogonality losses (hyperparameters in the constructor)."""
from __future__ import annotations

import torch

from . import (cross_orthogonality, feature_orthogonality, gram_orthogonality, ntkcl_contrastive,
               projection_residual, prototype_basis)


class FeatureOrthogonality(torch.nn.Module):
    """Module form of `feature_orthogonality`: `forward(features, prototypes)`."""

    def __init__(self, *, normalize: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.normalize, self.reduction, self.backend = normalize, reduction, backend

    def forward(self, features, prototypes):
        return feature_orthogonality(features, prototypes, normalize=self.normalize,
                                     reduction=self.reduction, backend=self.backend)


class ProjectionResidual(torch.nn.Module):
    """Module form of `projection_residual` with a fixed basis (a buffer), e.g. from
    `prototype_basis` of the previous tasks' prototypes: `forward(features)`."""

    def __init__(self, basis: torch.Tensor, *, normalize: bool = True, reduction: str = "sum",
                 backend: str = "auto"):
        super().__init__()
        self.register_buffer("basis", basis.detach())
        self.normalize, self.reduction, self.backend = normalize, reduction, backend

    @classmethod
    def from_prototypes(cls, prototypes: torch.Tensor, rank: int, **kwargs) -> "ProjectionResidual":
        return cls(prototype_basis(prototypes, rank), **kwargs)

    def forward(self, features):
        return projection_residual(features, self.basis, normalize=self.normalize,
                                   reduction=self.reduction, backend=self.backend)


class GramOrthogonality(torch.nn.Module):
    """Module form of `gram_orthogonality`: `forward(weights)`."""

    def __init__(self, *, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, weights):
        return gram_orthogonality(weights, reduction=self.reduction, backend=self.backend)


class CrossOrthogonality(torch.nn.Module):
    """Module form of `cross_orthogonality`: `forward(old, new)`."""

    def __init__(self, *, norm: str = "l1", backend: str = "auto"):
        super().__init__()
        self.norm, self.backend = norm, backend

    def forward(self, old, new):
        return cross_orthogonality(old, new, norm=self.norm, backend=self.backend)


class NtkclContrastive(torch.nn.Module):
    """Module form of `ntkcl_contrastive`: `forward(features, labels)`."""

    def __init__(self, *, temperature: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, features, labels):
        return ntkcl_contrastive(features, labels, temperature=self.temperature, backend=self.backend)
