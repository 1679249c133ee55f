"""EMA written for clarity: ema <- torch.lerp(ema, src, 1 - d), math in fp32 (fp64 for fp64).

torch.lerp (ATen/native/Lerp.h) computes `w < 0.5 ? a + w * (b - a) : b - (b - a) * (1 - w)`,
each with one rounding (an FMA), so decay 0 copies src exactly and fp32 results equal timm's
`torch._foreach_lerp_(ema, src, 1 - decay)` bit for bit.
"""
from __future__ import annotations

import torch


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


@torch.no_grad()
def ema_update_(ema: list[torch.Tensor], src: list[torch.Tensor], decay) -> None:
    """`decay`: one float per pair, or a 0-d tensor shared by all pairs."""
    for i, (e, s) in enumerate(zip(ema, src)):
        acc = math_dtype(e.dtype, s.dtype)
        # the weight 1 - decay in fp64, rounded once to the math type, as torch rounds a Python float
        w = (1 - decay.double()).to(acc) if isinstance(decay, torch.Tensor) else 1 - decay[i]
        e.copy_(torch.lerp(e.to(acc), s.to(acc), w))
