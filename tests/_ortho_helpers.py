"""Shared pieces of the orthogonality tests: inputs, the eager baselines as test callables, and the
check of a value and every gradient against the fp64 reference within the error budget."""
from __future__ import annotations

import pytest
import torch

from ntkcl_fast.reference import ortho_eager as eager

from ._helpers import assert_within_budget, assert_within_budget_of_sum, device_backends, interpreted_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def pairs(op: str) -> list:
    return device_backends(op)


def rand(gen, shape, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device, dtype)


def leaf_copies(tensors):
    return [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors]


def grads_of(fn, tensors):
    """Value and gradients of fn(*tensors) by autograd, for the floating tensors."""
    leaves = leaf_copies(tensors)
    out = fn(*leaves)
    floating = [t for t in leaves if t.is_floating_point()]
    grads = torch.autograd.grad(out, floating, allow_unused=True) if out.requires_grad and torch.isfinite(out) else \
        [torch.zeros_like(t) for t in floating]
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(floating, grads)]
    return out.detach(), grads


def check(fast, oracle, eager, tensors, *, backend, device, value_terms=None, what=""):
    """Value and every gradient of `fast` within the error budget of the fp64 `oracle`.

    `value_terms`: for a value that is a signed sum, its terms in fp64; the value's floor is then
    one ulp of their absolute sum (`assert_within_budget_of_sum`)."""
    extra = 1 if interpreted_triton(backend, device) else 0
    t64 = [t.double() if t.is_floating_point() else t for t in tensors]
    want_v, want_g = grads_of(oracle, t64)
    eager_v, eager_g = grads_of(eager, tensors)
    leaves = leaf_copies(tensors)
    out = fast(*leaves)
    want_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors if t.is_floating_point()) \
        else torch.float32
    assert out.dtype == want_dtype and out.dim() == 0 and out.requires_grad, (out.dtype, out.shape)
    if torch.isinf(want_v):
        assert torch.isinf(out) and out > 0, f"{what}: expected +inf, got {out}"
    elif value_terms is not None:
        assert_within_budget_of_sum(out.detach(), want_v, eager_v, value_terms, what=f"{what} value")
    else:
        assert_within_budget(out.detach(), want_v, eager_v, what=f"{what} value")
    out.backward()
    floating = [t for t in leaves if t.is_floating_point()]
    for i, (leaf, w, e) in enumerate(zip(floating, want_g, eager_g)):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        assert torch.isfinite(leaf.grad).all(), f"{what}: grad {i} not finite"
        assert_within_budget(leaf.grad, w, e, extra_ulps=extra, what=f"{what} grad {i} {leaf.dtype}")


# ----------------------------------------------------------------------------- eager baselines
# What users write today (ntkcl_fast.reference.ortho_eager), in the inputs' dtype: the budget is
# relative to their error. Each returns fn(*tensors) for `check`.

def eager_feature_orthogonality(normalize, reduction):
    return lambda f, p: eager.feature_orthogonality(f, p, normalize=normalize, reduction=reduction)


def eager_projection_residual(normalize, reduction):
    return lambda f, u: eager.projection_residual(f, u, normalize=normalize, reduction=reduction)


def eager_gram(reduction):
    return lambda *ws: eager.gram_orthogonality(ws, reduction=reduction)


def eager_cross(norm, n):
    return lambda *ts: eager.cross_orthogonality(ts[:n], ts[n:], norm=norm)


def eager_contrastive(t):
    return lambda f, labels: eager.ntkcl_contrastive(f, labels, temperature=t)


def cases(pairs, small, large, combos, large_combos):
    """(device, backend, shape, *combo): every combo on the small shapes; the large shapes only on
    the compiled and reference backends (the Triton interpreter is slow), with fewer combos."""
    out = []
    for pair in pairs:
        device, backend = pair.values
        if backend != "torch":
            # fp64: the budget rule degenerates (eager fp64 is the oracle itself, error 0), so the
            # compiled backends are checked in fp64 by test_fp64_compiled_backends (assert_close
            # defaults and gradcheck); the Triton kernels take fp16/bf16/fp32 (test_triton_rejects_fp64)
            combos = [c for c in combos if c[0] != torch.float64]
            large_combos = [c for c in large_combos if c[0] != torch.float64]
        for shape in small:
            out += [pytest.param(device, backend, shape, *c, marks=pair.marks) for c in combos]
        if not interpreted_triton(backend, device):
            for shape in large:
                out += [pytest.param(device, backend, shape, *c, marks=pair.marks) for c in large_combos]
    return out
