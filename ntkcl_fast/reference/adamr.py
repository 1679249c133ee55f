"""AdamR step written for clarity: Adam plus a decoupled pull toward anchor weights (DAREx's AdamR).

For each element (math in fp32, fp64 when params, grads or moments are fp64; moments kept in
their own dtype), with t = step + 1 the step being taken, bc1 = 1 - beta1^t, bc2 = 1 - beta2^t:
    m  <- beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g^2
    vm <- max(vm, v)                     (AMSGrad only; the denominator then uses vm)
    p  <- p - lr * weight_decay * p - c * D(p - anchor) - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
with D the identity (L2 pull) or sign (L1 pull), every decoupled term computed from p before the
step, and c = pull * lr / sqrt(V) when V (DAREx's normalizer, `v_mean`) is given (1 in place of
sqrt(V) where V == 0), else c = pull * lr. V is the mean over all elements of every parameter
that takes the step of v / bc2 (vm / bc2 with AMSGrad): `adamr_v_hat_sum` gives the sum of one
list, the optimizer adds the lists and divides by their element count.
Bias corrections, lr / bc1, 1 / sqrt(bc2) and c are computed in fp64 and rounded once to the math
type. `state_steps` hold the steps taken so far (0-d tensors); the step adds one to each.
"""
from __future__ import annotations

import torch


def _acc(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _new_second_moment(g, v, vm, beta2, acc):
    g = g.to(acc)
    v_new = beta2 * v.to(acc) + (1 - beta2) * g * g
    vm_new = None if vm is None else torch.maximum(vm.to(acc), v_new)  # NaN-propagating, as torch's AMSGrad
    return v_new, vm_new


def _bias_correction(beta: float, step: torch.Tensor) -> torch.Tensor:
    return 1 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=step.device), step.double() + 1)


@torch.no_grad()
def adamr_v_hat_sum(grads, exp_avg_sq, max_exp_avg_sq, state_steps, *, beta2) -> torch.Tensor:
    """0-d fp64 sum over the list of the bias-corrected new second moment (of its running max
    when `max_exp_avg_sq` is not empty), as the step would compute it; writes nothing."""
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, (g, v, step) in enumerate(zip(grads, exp_avg_sq, state_steps)):
        vm = max_exp_avg_sq[i] if max_exp_avg_sq else None
        v_new, vm_new = _new_second_moment(g, v, vm, beta2, _acc(g, v))
        total = total + (v_new if vm_new is None else vm_new).double().sum() / _bias_correction(beta2, step)
    return total


@torch.no_grad()
def adamr_step_(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean, *, lr, beta1,
                beta2, eps, weight_decay, pull, l1) -> None:
    if v_mean is None:
        pull_coef = torch.tensor(pull * lr, dtype=torch.float64)
    else:
        v64 = v_mean.double()
        pull_coef = pull * lr / torch.where(v64 == 0, torch.ones_like(v64), v64.sqrt())
    for i, (p, g, m, v, a, step) in enumerate(zip(params, grads, exp_avg, exp_avg_sq, anchors, state_steps)):
        vm = max_exp_avg_sq[i] if max_exp_avg_sq else None
        acc = _acc(p, g, m)
        bc1, bc2 = _bias_correction(beta1, step), _bias_correction(beta2, step)
        step_size = (lr / bc1).to(p.device, acc)
        inv_sqrt_bc2 = (1 / bc2.sqrt()).to(p.device, acc)
        decay = torch.tensor(lr * weight_decay, dtype=torch.float64).to(p.device, acc)
        coef = pull_coef.to(p.device, acc)
        p_acc = p.to(acc)
        m_new = beta1 * m.to(acc) + (1 - beta1) * g.to(acc)
        v_new, vm_new = _new_second_moment(g, v, vm, beta2, acc)
        diff = p_acc - a.to(acc)
        drift = torch.sign(diff) if l1 else diff
        p_new = p_acc - decay * p_acc - coef * drift
        denom = (v_new if vm_new is None else vm_new).sqrt() * inv_sqrt_bc2 + eps
        p_new = p_new - step_size * m_new / denom
        m.copy_(m_new)
        v.copy_(v_new)
        if vm is not None:
            vm.copy_(vm_new)
        p.copy_(p_new)
    torch._foreach_add_(list(state_steps), 1)
