"""Fused kernels for continual-learning regularizers and parameter updates."""
from ._backend import backends
from .dare import (dare, dare_delta_, dare_mask, dare_state_dict, darex_analytic_q, darex_q_search,
                   magnitude_prune_)
from .adamr import AdamR
from .ema import ModelEMA, ema_multi_avg_fn, ema_update_
from .ewc import EWC
from .ortho import (CrossOrthogonality, FeatureOrthogonality, GramOrthogonality, NtkclContrastive,
                    ProjectionResidual, cross_orthogonality, feature_orthogonality, gram_orthogonality,
                    ntkcl_contrastive, projection_residual, prototype_basis)
from .penalty import fisher_accumulate_, l2_penalty, l2_penalty_grad_
from .random import tensor_key
from . import merge  # noqa: E402,F401  (registers merge_tensors' fake kernel and Triton op with the package)

__version__ = "0.1.0"

__all__ = ["AdamR", "CrossOrthogonality", "EWC", "FeatureOrthogonality", "GramOrthogonality", "ModelEMA",
           "NtkclContrastive", "ProjectionResidual", "cross_orthogonality", "feature_orthogonality",
           "gram_orthogonality", "ntkcl_contrastive", "projection_residual", "prototype_basis", "backends", "dare",
           "dare_delta_", "dare_mask", "dare_state_dict",
           "darex_analytic_q", "darex_q_search", "ema_multi_avg_fn", "ema_update_", "fisher_accumulate_",
           "l2_penalty", "l2_penalty_grad_", "magnitude_prune_", "tensor_key"]
