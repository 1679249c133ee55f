"""PEFT's pruning helpers (`random_pruning`, `magnitude_based_pruning`, `prune`) on our kernels."""
from __future__ import annotations

import math
from typing import Literal

import torch

from ..dare import _floating, dare_delta_, prune_k_


class InvalidArgument(ValueError, RuntimeError):
    """Raised where PEFT raises RuntimeError (torch.bernoulli's or torch.topk's range checks); a
    ValueError too, as this package's contract asks for bad arguments."""


def _number(density, name: str = "density") -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(density).__name__}")
    return float(density)


def _rescale_name(rescale) -> str:
    """PEFT's bool (True: divide by density) or one of our names "density", "l1", "none"."""
    if isinstance(rescale, bool):
        return "density" if rescale else "none"
    if rescale in ("density", "l1", "none"):
        return rescale
    raise ValueError(f"rescale must be a bool or one of 'density', 'l1', 'none', got {rescale!r}")


def as_peft_drops(pruned: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """PEFT computes `tensor * mask`, so a dropped +-inf or NaN entry is NaN there, not 0.

    In place on `pruned`: an entry our kernels set to 0 whose input is not finite becomes NaN
    (a finite input gives 0 either way; only bool temporaries, no second float tensor).
    """
    return pruned.masked_fill_((pruned == 0) & ~tensor.isfinite(), float("nan"))


def random_pruning(tensor: torch.Tensor, density: float, rescale, *, seed: int = 0, key: int = 0,
                   backend: str = "auto") -> torch.Tensor:
    """Keep each entry with probability `density` (the DARE keep rule, p = 1 - density).

    `rescale`: True or "density" divides the kept entries by `density`, "l1" scales them to the
    tensor's L1 norm (mergekit), False or "none" leaves them. `density` outside [0, 1] raises
    `InvalidArgument` (PEFT: RuntimeError from torch.bernoulli). `density == 0` gives
    `tensor * 0`, where PEFT divides 0 by 0 (NaN everywhere).
    """
    density = _number(density)
    if not 0.0 <= density <= 1.0:
        raise InvalidArgument(f"density must be in [0, 1], got {density}")
    rescale = _rescale_name(rescale)
    _floating(tensor, "tensor")
    p = 1.0 - density
    if density == 0.0:
        return tensor.detach() * 0
    out = tensor.detach().clone()
    # q = density itself, not 1 - p: the two differ by a rounding, and PEFT divides by density
    q = density if rescale == "density" else None
    out = dare_delta_(out, p, q=q, rescale=rescale, seed=seed, key=key, backend=backend)
    return as_peft_drops(out, tensor.detach())


def magnitude_k(tensor: torch.Tensor, density: float) -> int:
    """PEFT's count `int(density * numel)`; outside [0, numel] torch.topk raises there, so do we."""
    density = _number(density)
    if not math.isfinite(density):
        raise InvalidArgument(f"density must be a finite number, got {density}")
    k = int(density * tensor.numel())
    if not 0 <= k <= tensor.numel():
        raise InvalidArgument(f"density {density} keeps k = {k} of {tensor.numel()} entries; "
                              f"k must be in [0, numel]")
    return k


def magnitude_based_pruning(tensor: torch.Tensor, density: float, *, backend: str = "auto") -> torch.Tensor:
    """Keep the `int(density * numel)` entries of largest magnitude (NaN first), drop the rest as PEFT does."""
    _floating(tensor, "tensor")
    k = magnitude_k(tensor, density)
    out = prune_k_(tensor.detach().clone(), k, backend=backend)
    return as_peft_drops(out, tensor.detach())


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale=False,
          *, seed: int = 0, key: int = 0, backend: str = "auto") -> torch.Tensor:
    """PEFT's `prune`: `density >= 1` returns `tensor` itself (without PEFT's warning), below 0 raises."""
    density = _number(density)
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density, backend=backend)
    if method == "random":
        return random_pruning(tensor, density, rescale, seed=seed, key=key, backend=backend)
    raise ValueError(f"Unknown method {method}")
