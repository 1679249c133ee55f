"""AdamR on DTensor parameters (FSDP2's `fully_shard`, `distribute_tensor`).

Every term of the update is elementwise, so each rank steps the local shards of its params,
grads, moments and anchors with the plain fused ops, communicating nothing. Only DAREx's V is
global: each rank sums its shards' share, one all-reduce per step (not per tensor or group) adds
the shares over the mesh dimension that shards them, and the replicated parameters, whole on
every rank, are added once after it. Step counts stay plain 0-d tensors on each parameter's
device, as torch.optim keeps them under FSDP2.
"""
from __future__ import annotations

import torch

from .. import distributed
from . import _ops


def check_kinds(params: list, labels: list[str]) -> bool:
    """True when the stepping params are DTensors: all of them or none (ValueError naming the
    first that differs), since V is either one global mean or one local one."""
    kinds = [distributed.is_dtensor(p) for p in params]
    if not kinds or all(kinds) == any(kinds):
        return bool(kinds) and kinds[0]
    odd = kinds.index(not kinds[0])
    raise ValueError(f"{labels[odd]} is {'a DTensor' if kinds[odd] else 'a plain Tensor'} but {labels[0]} is "
                     f"{'a DTensor' if kinds[0] else 'a plain Tensor'}; AdamR steps all DTensors or none")


def local_lists(lists, labels: list[str]):
    """`lists` (one fused call's tensor lists in `_ops.step_`'s order; the last, step counts, stays
    as is) as local shards, after checking that every grad and state tensor is a DTensor with its
    param's mesh and placements (ValueError naming it otherwise)."""
    params, *others, steps = lists
    names = ("grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "anchor")
    for i, p in enumerate(params):
        distributed.check_placements(p, labels[i])
        for n, lst in zip(names, others):
            if lst:  # max_exp_avg_sq is empty without AMSGrad
                distributed.check_pair(p, labels[i], lst[i],
                                       f"{labels[i]}.grad" if n == "grad" else f"state[{labels[i]}][{n!r}]")
    return tuple([t.to_local() for t in lst] for lst in (params, *others)) + (steps,)


def v_mean(plans, calls, labels: list[str]) -> torch.Tensor:
    """The global V: (sum of every shard's share, all-reduced once + the replicated params'
    share) / the global element count."""
    params = [p for _, ps, _ in plans for p in ps]
    sharded, _, group = distributed.reduction_split(params, "params", labels)
    sharded = set(sharded)
    device = plans[0][1][0].device
    parts = {True: [], False: []}
    start = 0
    for (g, ps, name), (_, grads, _, exp_avg_sq, max_exp_avg_sq, _, steps) in zip(plans, calls):
        for is_sharded in (True, False):
            idx = [j for j in range(len(ps)) if (start + j in sharded) == is_sharded]
            if idx:
                parts[is_sharded].append(_ops.v_hat_sum(
                    name, _pick(grads, idx), _pick(exp_avg_sq, idx), _pick(max_exp_avg_sq, idx), _pick(steps, idx),
                    beta2=g["betas"][1]).to(device))
        start += len(ps)
    total = torch.zeros((), dtype=torch.float64, device=device)
    if parts[True]:
        total = sum(parts[True][1:], parts[True][0])
        torch.distributed.all_reduce(total, group=group)
    for s in parts[False]:
        total = total + s
    return total / max(sum(p.numel() for p in params), 1)  # a DTensor's numel is the global one


def _pick(tensors: list, idx: list[int]) -> list:
    return [tensors[j] for j in idx] if tensors else []  # an empty list: no AMSGrad state
