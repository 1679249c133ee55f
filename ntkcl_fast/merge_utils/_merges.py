"""PEFT's merges of task tensors (`task_arithmetic`, `magnitude_prune`, `ties`, `dare_linear`,
`dare_ties`) and their stacked-tensor helpers, as one pass over the list with O(numel) accumulators.

PEFT stacks the N task tensors and builds several N x numel temporaries (the stack, its signs,
the sign mask, the weighted stack and its masked copy). Here each merge walks the list and keeps
only a few numel-sized accumulators; the per-element math is `_elementwise`. The ties merges walk
the list twice (elect the sign, then merge), sparsifying each task again on the second walk: the
DARE mask is recomputed from its key, the magnitude cut is selected again.
"""
from __future__ import annotations

from typing import Literal

import torch

from .. import _validate
from ..dare import _floating
from ..random import M64
from . import _elementwise as ew
from ._pruning import InvalidArgument, prune


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """PEFT's helper: `weights` viewed with trailing 1-dims to broadcast over `task_tensors`."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _method(method) -> str:
    if method not in ("total", "frequency"):
        raise InvalidArgument(f'majority_sign_method must be "total" or "frequency", got {method!r}')
    return method


def _tasks(task_tensors, weights) -> tuple[list[torch.Tensor], torch.dtype]:
    """The task list (checked) and PEFT's product dtype promote(task dtype, weights dtype)."""
    tasks = _validate.tensor_list(task_tensors, "task_tensors")
    if not tasks:
        raise ValueError("task_tensors must hold at least one tensor")
    _validate.floating_list(tasks, "task_tensors")
    for i, t in enumerate(tasks[1:], 1):
        if t.shape != tasks[0].shape or t.dtype != tasks[0].dtype:
            raise ValueError(f"task_tensors[{i}] is {tuple(t.shape)} {t.dtype}, task_tensors[0] is "
                             f"{tuple(tasks[0].shape)} {tasks[0].dtype}; they must agree")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a 1-D tensor (PEFT's), got {type(weights).__name__}")
    if weights.shape != (len(tasks),) or not weights.is_floating_point():
        raise ValueError(f"weights must be a floating 1-D tensor of length {len(tasks)}, "
                         f"got {weights.dtype} of shape {tuple(weights.shape)}")
    _validate.one_device([("task_tensors", tasks), ("weights", [weights])])
    return [t.detach() for t in tasks], torch.promote_types(tasks[0].dtype, weights.dtype)


def _weighted_sum(tasks, weights, product, sparsify) -> torch.Tensor:
    acc = torch.zeros(tasks[0].shape, dtype=ew.accumulator_dtype(product), device=tasks[0].device)
    for i, t in enumerate(tasks):
        ew.add_(acc, ew.weighted(sparsify(i, t), weights[i], product))
    return acc.to(product)


def _ties(tasks, weights, product, method, sparsify) -> torch.Tensor:
    dtype, device = tasks[0].dtype, tasks[0].device
    vote = torch.zeros(tasks[0].shape, dtype=ew.accumulator_dtype(dtype), device=device)
    for i, t in enumerate(tasks):
        ew.add_vote_(vote, sparsify(i, t), method)
    majority = ew.majority_sign(vote, dtype)
    del vote
    wsum = torch.zeros(tasks[0].shape, dtype=ew.accumulator_dtype(product), device=device)
    count = torch.zeros(tasks[0].shape, dtype=torch.int32, device=device)
    for i, t in enumerate(tasks):
        s = sparsify(i, t)
        ew.add_disjoint_(wsum, count, ew.weighted(s, weights[i], product), ew.agrees(s, majority))
    return ew.disjoint_mean(wsum, count, product)


def _magnitude(density, backend):
    return lambda i, t: prune(t, density, method="magnitude", backend=backend)


def _random(density, rescale, seed, key, backend):
    return lambda i, t: prune(t, density, method="random", rescale=rescale, seed=seed, key=(key + i) & M64,
                              backend=backend)


def calculate_majority_sign_mask(tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"
                                 ) -> torch.Tensor:
    """PEFT's: for tasks stacked on dim 0, where each task's sign is the elected one (one running vote)."""
    _method(method)
    _floating(tensor, "tensor")
    if tensor.dim() == 0:
        raise ValueError("tensor must have the tasks stacked on dim 0, got a 0-d tensor")
    vote = torch.zeros(tensor.shape[1:], dtype=ew.accumulator_dtype(tensor.dtype), device=tensor.device)
    for t in tensor:
        ew.add_vote_(vote, t, method)
    majority = ew.majority_sign(vote, tensor.dtype)
    return torch.stack([ew.agrees(t, majority) for t in tensor])


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """PEFT's: the mean over dim 0 of the entries the mask keeps (a running sum and count)."""
    _floating(task_tensors, "task_tensors")
    if not isinstance(majority_sign_mask, torch.Tensor):
        raise TypeError(f"majority_sign_mask must be a Tensor, got {type(majority_sign_mask).__name__}")
    if majority_sign_mask.shape != task_tensors.shape:
        raise ValueError(f"majority_sign_mask must have task_tensors' shape {tuple(task_tensors.shape)}, "
                         f"got {tuple(majority_sign_mask.shape)}")
    if task_tensors.dim() == 0:
        raise ValueError("task_tensors must have the tasks stacked on dim 0, got a 0-d tensor")
    product = task_tensors.dtype
    wsum = torch.zeros(task_tensors.shape[1:], dtype=ew.accumulator_dtype(product), device=task_tensors.device)
    count = torch.zeros(task_tensors.shape[1:], dtype=torch.int32, device=task_tensors.device)
    for t, m in zip(task_tensors, majority_sign_mask):
        ew.add_disjoint_(wsum, count, t, m)
    return ew.disjoint_mean(wsum, count, product)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """PEFT's: `sum_i weights[i] * task_tensors[i]`."""
    tasks, product = _tasks(task_tensors, weights)
    return _weighted_sum(tasks, weights, product, lambda i, t: t)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, *,
                    backend: str = "auto") -> torch.Tensor:
    """PEFT's: magnitude-prune each task to `density`, then the weighted sum."""
    tasks, product = _tasks(task_tensors, weights)
    return _weighted_sum(tasks, weights, product, _magnitude(density, backend))


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total", *, backend: str = "auto") -> torch.Tensor:
    """PEFT's TIES: magnitude-prune, elect the sign on the unweighted tasks, disjoint mean of the weighted ones."""
    tasks, product = _tasks(task_tensors, weights)
    return _ties(tasks, weights, product, _method(majority_sign_method), _magnitude(density, backend))


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, *,
                rescale="density", seed: int = 0, key: int = 0, backend: str = "auto") -> torch.Tensor:
    """PEFT's `dare_linear`: DARE-sparsify task i under key `key + i`, then the weighted sum."""
    tasks, product = _tasks(task_tensors, weights)
    return _weighted_sum(tasks, weights, product, _random(density, rescale, seed, key, backend))


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total", *, rescale="density", seed: int = 0,
              key: int = 0, backend: str = "auto") -> torch.Tensor:
    """PEFT's `dare_ties`: DARE-sparsify task i under key `key + i`, elect the sign, disjoint mean."""
    tasks, product = _tasks(task_tensors, weights)
    return _ties(tasks, weights, product, _method(majority_sign_method),
                 _random(density, rescale, seed, key, backend))
