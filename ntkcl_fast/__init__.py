"""Fused kernels for continual-learning regularizers and parameter updates."""
from ._backend import backends
from .ema import ModelEMA, ema_multi_avg_fn, ema_update_
from .adamr import AdamR
from .ewc import EWC
from .penalty import fisher_accumulate_, l2_penalty, l2_penalty_grad_

__version__ = "0.1.0"

__all__ = ["AdamR", "EWC", "ModelEMA", "backends", "ema_multi_avg_fn", "ema_update_", "fisher_accumulate_", "l2_penalty",
           "l2_penalty_grad_"]
