"""Fused kernels for continual-learning regularizers and parameter updates."""
from ._backend import backends
from .dare import (dare, dare_delta_, dare_mask, dare_state_dict, darex_analytic_q, darex_q_search,
                   magnitude_prune_)
from .adamr import AdamR
from .ema import ModelEMA, ema_multi_avg_fn, ema_update_
from .ewc import EWC
from .penalty import fisher_accumulate_, l2_penalty, l2_penalty_grad_
from .random import tensor_key

__version__ = "0.1.0"

__all__ = ["AdamR", "EWC", "ModelEMA", "backends", "dare", "dare_delta_", "dare_mask", "dare_state_dict",
           "darex_analytic_q", "darex_q_search", "ema_multi_avg_fn", "ema_update_", "fisher_accumulate_",
           "l2_penalty", "l2_penalty_grad_", "magnitude_prune_", "tensor_key"]
