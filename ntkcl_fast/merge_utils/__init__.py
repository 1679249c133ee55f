"""Drop-in replacements for PEFT's `peft.utils.merge_utils`, on our kernels.

Same names and positional signatures as PEFT 0.21, so a PEFT user swaps the import; the
deterministic paths (`task_arithmetic`, `magnitude_based_pruning`, `magnitude_prune`, `ties`,
`calculate_majority_sign_mask`, `disjoint_merge`) equal PEFT's results bit for bit, dtypes
included. The merges walk the task list with O(numel) accumulators instead of stacking it.
Differences from PEFT, on purpose (docs/API.md, "PEFT merge_utils"):

- Mask RNG: PEFT draws `torch.bernoulli` from the global generator; here the mask is the DARE
  keep rule (Philox4x32-10) under the keyword-only `seed` and `key` (tensor i of a list uses
  `key + i`), with keep probability `density`. Results equal PEFT's given the same mask.
- DARE rescale: keyword `rescale` "density" (PEFT's division, computed in fp32 and rounded once),
  "l1" (mergekit) or "none"; `random_pruning` also takes PEFT's bool.
- `density == 0` in `random_pruning` gives `tensor * 0`, not PEFT's 0 / 0 = NaN.
- Ties at the magnitude cut go to the lower flat index (PEFT leaves them to `torch.topk`).
- `prune` with `density >= 1` returns the input like PEFT, without PEFT's warning.
- Where PEFT raises RuntimeError (bad densities, an unknown sign method) we raise
  `InvalidArgument`, which is both a RuntimeError and a ValueError.
"""
from ._merges import (calculate_majority_sign_mask, dare_linear, dare_ties, disjoint_merge, magnitude_prune,
                      reshape_weight_task_tensors, task_arithmetic, ties)
from ._pruning import InvalidArgument, magnitude_based_pruning, prune, random_pruning

__all__ = ["InvalidArgument", "calculate_majority_sign_mask", "dare_linear", "dare_ties", "disjoint_merge",
           "magnitude_based_pruning", "magnitude_prune", "prune", "random_pruning", "reshape_weight_task_tensors",
           "task_arithmetic", "ties"]
