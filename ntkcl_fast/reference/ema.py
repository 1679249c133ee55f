"""EMA written for clarity: ema <- ema + (1 - d) * (src - ema), math in fp32 (fp64 for fp64)."""
from __future__ import annotations

import torch


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


@torch.no_grad()
def ema_update_(ema: list[torch.Tensor], src: list[torch.Tensor], decay) -> None:
    """`decay`: one float per pair, or a 0-d tensor shared by all pairs."""
    for i, (e, s) in enumerate(zip(ema, src)):
        acc = math_dtype(e.dtype, s.dtype)
        d = decay.to(acc) if isinstance(decay, torch.Tensor) else decay[i]
        e_acc, s_acc = e.to(acc), s.to(acc)
        e.copy_(e_acc + (1 - d) * (s_acc - e_acc))
