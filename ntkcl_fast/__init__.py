"""Fused kernels for continual-learning regularizers and parameter updates."""
from ._backend import backends
from .ema import ModelEMA, ema_multi_avg_fn, ema_update_

__version__ = "0.1.0"

__all__ = ["ModelEMA", "backends", "ema_multi_avg_fn", "ema_update_"]
