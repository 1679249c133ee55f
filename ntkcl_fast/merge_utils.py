"""Drop-in replacements for PEFT's `peft.utils.merge_utils` pruning and DARE merges, on our kernels.

Same names and positional signatures as PEFT 0.21 (`random_pruning`, `prune`, `dare_linear`,
`dare_ties`, plus `magnitude_based_pruning`), so a PEFT user swaps the import. Differences from
PEFT's semantics, on purpose:

- Mask RNG: PEFT draws `torch.bernoulli` from the global torch generator; here the mask is the
  counter-based DARE keep rule (Philox4x32-10) under the keyword-only `seed` and `key` (tensor i
  of a list uses `key + i`), with keep probability `density` (DARE drop rate p = 1 - density).
  It is reproducible across devices and backends and never materialized, but it is not PEFT's
  stream: results match PEFT given the same mask, not given the same torch seed.
- Rescale: `tensor * mask / density` is computed in fp32 and rounded once (PEFT rounds twice in
  the tensor's dtype; identical for fp32, within one ulp for fp16/bf16).
- Magnitude pruning keeps exactly `int(density * numel)` entries like PEFT, with ties at the
  cut broken towards lower flat indices (PEFT leaves them to `torch.topk`).
- `density >= 1` returns the input unchanged like PEFT, without PEFT's warning.
"""
from __future__ import annotations

from typing import Literal

import torch

from .dare import _floating, dare_delta_, prune_k_

__all__ = ["dare_linear", "dare_ties", "magnitude_based_pruning", "prune", "random_pruning"]


def _keep_p(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not density >= 0:
        raise ValueError(f"density should be >= 0, got {density}")
    return 1.0 - min(float(density), 1.0)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool, *, seed: int = 0, key: int = 0,
                   backend: str = "auto") -> torch.Tensor:
    """Keep each entry with probability `density` (the DARE keep rule), dividing by `density` if `rescale`."""
    p = _keep_p(density)
    out = tensor.detach().clone()
    if p >= 1.0:
        return out.zero_()
    return dare_delta_(out, p, q=float(density) if rescale else 1.0, seed=seed, key=key, backend=backend)


def magnitude_based_pruning(tensor: torch.Tensor, density: float, *, backend: str = "auto") -> torch.Tensor:
    """Keep the `int(density * numel)` entries of largest magnitude (PEFT's count), zero the rest."""
    _keep_p(density)
    out = tensor.detach().clone()
    _floating(out, "tensor")
    k = min(int(density * tensor.numel()), tensor.numel())
    return prune_k_(out, k, backend=backend)


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False,
          *, seed: int = 0, key: int = 0, backend: str = "auto") -> torch.Tensor:
    if density >= 1:
        return tensor
    _keep_p(density)
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density, backend=backend)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale, seed=seed, key=key, backend=backend)
    raise ValueError(f"Unknown method {method}")


def _weights(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    new_shape = weights.shape + (1,) * (task_tensors.dim() - weights.dim())
    return weights.view(new_shape)


def _sparsify(task_tensors, density, seed, key, backend) -> torch.Tensor:
    return torch.stack([prune(t, density, method="random", rescale=True, seed=seed, key=key + i, backend=backend)
                        for i, t in enumerate(task_tensors)], dim=0)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, *, seed: int = 0,
                key: int = 0, backend: str = "auto") -> torch.Tensor:
    """PEFT's `dare_linear`: DARE-sparsify each task tensor, then their weighted sum."""
    stacked = _sparsify(task_tensors, density, seed, key, backend)
    return (stacked * _weights(stacked, weights)).sum(dim=0)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total", *, seed: int = 0, key: int = 0,
              backend: str = "auto") -> torch.Tensor:
    """PEFT's `dare_ties`: DARE-sparsify, elect the majority sign, disjoint weighted mean."""
    stacked = _sparsify(task_tensors, density, seed, key, backend)
    sign = stacked.sign()
    if majority_sign_method == "total":
        magnitude = stacked.sum(dim=0)
    elif majority_sign_method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{majority_sign_method}"')
    majority = sign == torch.where(magnitude >= 0, 1, -1)
    weighted = stacked * _weights(stacked, weights)
    return (weighted * majority).sum(dim=0) / torch.clamp(majority.sum(dim=0), min=1.0)
