"""AdamR step written for clarity: Adam plus a decoupled pull toward anchor weights.

For each element (math in fp32, fp64 for fp64 params; moments kept in fp32 or fp64):
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr * (weight_decay * p + pull * D(p - anchor))
           - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
with D the identity (L2 pull, DAREx-L2) or sign (L1 pull), bc1 = 1 - beta1^t, bc2 = 1 - beta2^t,
and the decoupled terms computed from p before the step (AdamW style).
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def adamr_step_(params, grads, exp_avg, exp_avg_sq, anchors, *, lr, beta1, beta2, eps, weight_decay, pull, l1,
                step) -> None:
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    for p, g, m, v, a in zip(params, grads, exp_avg, exp_avg_sq, anchors):
        acc = torch.float64 if torch.float64 in (p.dtype, g.dtype, m.dtype) else torch.float32
        p_acc, g_acc = p.to(acc), g.to(acc)
        m_new = beta1 * m.to(acc) + (1 - beta1) * g_acc
        v_new = beta2 * v.to(acc) + (1 - beta2) * g_acc * g_acc
        diff = p_acc - a.to(acc)
        drift = torch.sign(diff) if l1 else diff
        p_new = p_acc - lr * (weight_decay * p_acc + pull * drift)
        p_new = p_new - (lr / bc1) * m_new / (v_new.sqrt() / math.sqrt(bc2) + eps)
        m.copy_(m_new)
        v.copy_(v_new)
        p.copy_(p_new)
