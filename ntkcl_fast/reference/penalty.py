"""L2 / EWC penalty, its closed-form gradient and Fisher accumulation, written for clarity.

penalty = scale * sum_i sum(F_i * (p_i - a_i) ** 2), scale = lam * (0.5 if half else 1),
grad_i  = 2 * scale * F_i * (p_i - a_i) * grad_output,
fisher_i <- decay * fisher_i + scale * g_i ** 2.
Math runs in fp32 (fp64 when any input of a pair is fp64).
"""
from __future__ import annotations

import torch


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def l2_penalty(params, anchors, importance, scale: float) -> torch.Tensor:
    """The penalty, differentiable through autograd, in fp64 if any input is fp64 else fp32."""
    dtypes = [t.dtype for t in list(params) + list(anchors) + list(importance or [])]
    total = torch.zeros((), dtype=math_dtype(*dtypes), device=params[0].device if params else "cpu")
    for i, (p, a) in enumerate(zip(params, anchors)):
        f = importance[i] if importance is not None else None
        acc = math_dtype(p.dtype, a.dtype, *(() if f is None else (f.dtype,)))
        d = p.to(acc) - a.to(acc)
        q = d * d if f is None else f.to(acc) * d * d
        total = total + scale * q.sum().to(total.dtype)
    return total


@torch.no_grad()
def l2_penalty_grad(params, anchors, importance, scale: float, grad_output=1.0) -> list[torch.Tensor]:
    """The closed-form gradient of `l2_penalty` for each param, in the param's dtype."""
    out = []
    for i, (p, a) in enumerate(zip(params, anchors)):
        f = importance[i] if importance is not None else None
        acc = math_dtype(p.dtype, a.dtype, *(() if f is None else (f.dtype,)))
        go = grad_output.to(acc) if isinstance(grad_output, torch.Tensor) else grad_output
        g = (2 * scale) * (p.to(acc) - a.to(acc)) * go
        if f is not None:
            g = g * f.to(acc)
        out.append(g)
    return out


@torch.no_grad()
def fisher_accumulate_(fisher, grads, scale: float, decay: float) -> None:
    for f, g in zip(fisher, grads):
        acc = math_dtype(f.dtype, g.dtype)
        g_acc = g.to(acc)
        f.copy_(decay * f.to(acc) + scale * g_acc * g_acc)
