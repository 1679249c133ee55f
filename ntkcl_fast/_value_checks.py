"""Range checks of tensor-valued arguments (a 0-d decay, per-row DAREx q) as an op.

Reading a tensor's values on the host (`.item()`, `bool(t)`) breaks a torch.compile graph. As an
op of its own, the check stays one opaque node that runs when the graph runs, raises the same
ValueError as in eager mode, and hands its result to the math that follows, so it is never
dropped as dead code and always runs before the first write.
"""
from __future__ import annotations

import torch

_RULES = {
    "unit": ("in [0, 1]", lambda t: (t >= 0) & (t <= 1)),
    "positive": ("finite and > 0 in every row", lambda t: (t > 0) & torch.isfinite(t)),
}


@torch.library.custom_op("ntkcl_fast_checks::checked_values", mutates_args=())
def checked_values(values: torch.Tensor, rule: str, name: str) -> torch.Tensor:
    """A copy of `values` after checking every value against `rule`; ValueError naming `name` otherwise."""
    what, ok = _RULES[rule]
    if not bool(ok(values).all()):
        raise ValueError(f"{name} must be {what}")
    return values.clone()


@checked_values.register_fake
def _checked_values_fake(values, rule, name):
    return torch.empty_like(values)


def _checked_values_backward(ctx, grad):
    return grad, None, None  # the values pass through unchanged


checked_values.register_autograd(_checked_values_backward)
