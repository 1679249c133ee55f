"""The per-element math of PEFT's merges, one task tensor at a time.

Every merge in `_merges.py` is a loop over the task list that calls these functions on O(numel)
accumulators; a fused merge kernel replaces the loop and these bodies together. The dtypes follow
what PEFT's stacked expressions produce, so the results are PEFT's bit for bit:

- PEFT multiplies the stacked tensors (dtype D) by a 1-D weight tensor, so each product is
  rounded to `promote(D, weights.dtype)` (the "product dtype" P);
- `stack(...).sum(dim=0)` accumulates in fp32 (fp64 for fp64) in list order and rounds once to
  its input's dtype;
- the disjoint merge divides by `clamp(count, min=1.0)`, an fp32 tensor, so its result has
  dtype `promote(P, fp32)`.
"""
from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted(t: torch.Tensor, w: torch.Tensor, product: torch.dtype) -> torch.Tensor:
    """One task's `t * w`, rounded to the product dtype (w a 0-d weight)."""
    return t.to(product) * w.to(product)


def add_(acc: torch.Tensor, term: torch.Tensor) -> None:
    """One step of `sum(dim=0)`: add a rounded term to the wide accumulator."""
    acc.add_(term.to(acc.dtype))


def add_vote_(vote: torch.Tensor, t: torch.Tensor, method: str) -> None:
    """PEFT's sign election: "total" sums the values, "frequency" their signs."""
    add_(vote, t if method == "total" else t.sign())


def majority_sign(vote: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """+1 where the vote (rounded to the tasks' dtype, as PEFT's sum is) is >= 0, else -1 (int8:
    PEFT's int64 holds the same values in eight times the bytes)."""
    return (vote.to(dtype) >= 0).to(torch.int8) * 2 - 1


def agrees(t: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """Where a task takes part in the disjoint merge: its sign is the majority's (zeros never)."""
    return t.sign() == majority


def add_disjoint_(wsum: torch.Tensor, count: torch.Tensor, term: torch.Tensor, agree: torch.Tensor) -> None:
    """Running weighted sum and count of the agreeing entries (a product, so inf * False is NaN as in PEFT)."""
    add_(wsum, term * agree)
    count.add_(agree)


def disjoint_mean(wsum: torch.Tensor, count: torch.Tensor, product: torch.dtype) -> torch.Tensor:
    """PEFT's `sum(...) / clamp(count, min=1.0)`: the sum rounded to the product dtype, then divided in fp32 or wider."""
    out = torch.promote_types(product, torch.float32)
    return wsum.to(product).to(out) / torch.clamp(count, min=1.0).to(out)
