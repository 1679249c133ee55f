"""Fused kernels for continual-learning regularizers and parameter updates."""
from ._backend import backends
from .dare import (dare, dare_delta_, dare_mask, dare_state_dict, darex_analytic_q, darex_q_search,
                   magnitude_prune_)
from .random import tensor_key
from .ema import ModelEMA, ema_multi_avg_fn, ema_update_

__version__ = "0.1.0"

__all__ = ["ModelEMA", "backends", "dare", "dare_delta_", "dare_mask", "dare_state_dict", "darex_analytic_q",
           "darex_q_search", "ema_multi_avg_fn", "ema_update_", "magnitude_prune_", "tensor_key"]
