"""mergekit's per-tensor math, transcribed from arcee-ai/mergekit (mergekit/sparsify.py and
mergekit/merge_methods/generalized_task_arithmetic.py, linear.py) to test our reference against.

Kept as they wrote it: math in the input dtype, `tensor * mask` with a float mask, the
divisor rules, lambda applied only when != 1. Changed, and only where their code cannot be run
deterministically: `torch.bernoulli` (global RNG) is replaced by a given keep mask (we pass
ntkcl_fast.dare_mask), and their unstable argsort by a stable one (ties at the threshold then go
to lower indices; with distinct magnitudes the two agree).
"""
from __future__ import annotations

import torch


def rescaled_masked_tensor(tensor, mask, norm, eps: float = 1e-7):
    masked = tensor * mask
    if norm is None:
        return masked
    assert norm == "l1", norm
    before_scale = tensor.abs().sum()
    after_scale = masked.abs().sum()
    if before_scale < eps or after_scale < eps:
        return masked
    return masked * (before_scale / after_scale)


def magnitude(tensor, density: float, rescale_norm=None):
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    assert k > 0, "not gonna zero out the whole tensor buddy"
    mask = torch.zeros_like(tensor)
    w = tensor.abs().view(-1)
    if w.device.type == "cpu":
        w = w.float()
    topk = torch.argsort(w, descending=True, stable=True)[:k]
    mask.view(-1)[topk] = 1
    return rescaled_masked_tensor(tensor, mask, rescale_norm)


def random(tensor, density: float, keep: torch.Tensor, rescale_norm=None):
    """mergekit's `bernoulli` with its mask drawn elsewhere."""
    if density >= 1:
        return tensor
    return rescaled_masked_tensor(tensor, keep.to(tensor.dtype), rescale_norm)


def get_mask(delta, method: str = "sum"):
    sign = delta.sign().to(delta.dtype)
    assert method == "sum"
    majority_sign = (delta.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    return sign == majority_sign


def generalized_task_arithmetic(base, models, weights, densities, *, consensus: bool, sparsification, normalize,
                                rescale_norm, lambda_: float, keeps=None):
    """GTATask.execute for one tensor; `sparsification` None, "magnitude" or "random"
    (`keeps[i]` the keep mask of model i)."""
    deltas = []
    for i, (m, density) in enumerate(zip(models, densities)):
        delta = m.to(base.dtype) - base
        if sparsification == "magnitude":
            delta = magnitude(delta, density, rescale_norm)
        elif sparsification == "random":
            delta = random(delta, density, keeps[i], rescale_norm)
        deltas.append(delta)
    deltas = torch.stack(deltas, dim=0)
    weights = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    while len(deltas.shape) > len(weights.shape):
        weights.unsqueeze_(-1)
    weighted_deltas = deltas * weights
    if consensus:
        mask = get_mask(weighted_deltas).to(base.dtype)
        mixed_delta = (weighted_deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed_delta = weighted_deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed_delta /= divisor
    if lambda_ != 1:
        mixed_delta *= lambda_
    return (base + mixed_delta).to(base.dtype)


def linear(models, weights, normalize: bool):
    """LinearMergeTask.execute for one tensor (the base, if any, is one of `models` there)."""
    tensors = torch.stack(models, dim=0)
    weights = torch.tensor(weights, dtype=tensors.dtype, device=tensors.device)
    while len(weights.shape) < len(tensors.shape):
        weights.unsqueeze_(-1)
    res = (weights * tensors).sum(dim=0)
    if normalize:
        res = res / weights.sum(dim=0)
    return res
