"""Triton AdamR kernels: the step and the sum of DAREx's V, one launch per dtype combination each.

Step counts and V stay on the device (no host sync); the sum writes one fp64 partial per program
and the partials are added by one fixed-shape torch sum, the same order every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._table import TL_DTYPE, chunk_table, find_tensor

CHUNK = 4096


@triton.jit
def _nan_max(a, b):
    return tl.where((a > b) | (a != a), a, b)  # torch.maximum: NaN from either side wins


@triton.jit
def _adamr_step_kernel(table, count, hyper, v_mean_ptr, L1: tl.constexpr,
                       AMSGRAD: tl.constexpr, HAS_V: tl.constexpr, P: tl.constexpr, G: tl.constexpr,
                       S: tl.constexpr, A: tl.constexpr, ACC: tl.constexpr, P_VIA_FP32: tl.constexpr,
                       CHUNK: tl.constexpr, STEPS: tl.constexpr):
    # table rows: params, grads, exp_avg, exp_avg_sq, anchors, max_exp_avg_sq, state_steps, numel, first chunk
    pid = tl.program_id(0)
    t = find_tensor(table + 8 * count, count, pid, STEPS)
    p_ptr = tl.load(table + t).to(tl.pointer_type(P))
    g_ptr = tl.load(table + count + t).to(tl.pointer_type(G))
    m_ptr = tl.load(table + 2 * count + t).to(tl.pointer_type(S))
    v_ptr = tl.load(table + 3 * count + t).to(tl.pointer_type(S))
    a_ptr = tl.load(table + 4 * count + t).to(tl.pointer_type(A))
    step_ptr = tl.load(table + 6 * count + t).to(tl.pointer_type(tl.float32))
    n = tl.load(table + 7 * count + t)
    offs = (pid - tl.load(table + 8 * count + t)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    # hyper (fp64): lr, beta1, beta2, eps, weight_decay, pull; per-tensor factors in fp64, rounded
    # once to the math type
    lr64 = tl.load(hyper)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    step = tl.load(step_ptr).to(tl.float64) + 1.0
    step_size = (lr64 / (1.0 - tl.exp(step * tl.log(beta1)))).to(ACC)
    inv_sqrt_bc2 = (1.0 / tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))).to(ACC)
    coef64 = tl.load(hyper + 5) * lr64
    if HAS_V:
        v_mean = tl.load(v_mean_ptr).to(tl.float64)
        coef64 = coef64 / tl.where(v_mean == 0.0, 1.0, tl.sqrt(v_mean))
    coef = coef64.to(ACC)
    decay = (lr64 * tl.load(hyper + 4)).to(ACC)
    b1 = beta1.to(ACC)
    b2 = beta2.to(ACC)
    p = tl.load(p_ptr + offs, mask=mask).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    m = b1 * tl.load(m_ptr + offs, mask=mask).to(ACC) + (1 - b1) * g
    v = b2 * tl.load(v_ptr + offs, mask=mask).to(ACC) + (1 - b2) * g * g
    den = v
    if AMSGRAD:
        vm_ptr = tl.load(table + 5 * count + t).to(tl.pointer_type(S))
        den = _nan_max(tl.load(vm_ptr + offs, mask=mask).to(ACC), v)
        tl.store(vm_ptr + offs, den.to(S), mask=mask)
    diff = p - tl.load(a_ptr + offs, mask=mask).to(ACC)
    if L1:
        diff = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(ACC)
    p = p - decay * p - coef * diff
    p = p - step_size * m / (tl.sqrt(den) * inv_sqrt_bc2 + tl.load(hyper + 3).to(ACC))
    tl.store(m_ptr + offs, m.to(S), mask=mask)
    tl.store(v_ptr + offs, v.to(S), mask=mask)
    if P_VIA_FP32:
        p = p.to(tl.float32)
    tl.store(p_ptr + offs, p.to(P), mask=mask)


@triton.jit
def _v_hat_sum_kernel(table, count, partials, first_partial, beta2_ptr, AMSGRAD: tl.constexpr, G: tl.constexpr,
                      S: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr):
    # table rows: grads, exp_avg_sq, max_exp_avg_sq, state_steps, numel, first chunk
    pid = tl.program_id(0)
    t = find_tensor(table + 5 * count, count, pid, STEPS)
    g_ptr = tl.load(table + t).to(tl.pointer_type(G))
    v_ptr = tl.load(table + count + t).to(tl.pointer_type(S))
    step_ptr = tl.load(table + 3 * count + t).to(tl.pointer_type(tl.float32))
    n = tl.load(table + 4 * count + t)
    offs = (pid - tl.load(table + 5 * count + t)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    beta2 = tl.load(beta2_ptr)  # fp64
    step = tl.load(step_ptr).to(tl.float64) + 1.0
    inv_bc2 = 1.0 / (1.0 - tl.exp(step * tl.log(beta2)))
    b2 = beta2.to(ACC)
    g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    v = b2 * tl.load(v_ptr + offs, mask=mask).to(ACC) + (1 - b2) * g * g
    if AMSGRAD:
        vm_ptr = tl.load(table + 2 * count + t).to(tl.pointer_type(S))
        v = _nan_max(tl.load(vm_ptr + offs, mask=mask).to(ACC), v)
    v = tl.where(mask, v, 0.0)
    tl.store(partials + first_partial + pid, tl.sum(v.to(tl.float64), axis=0) * inv_bc2)


def _acc(*dtypes):
    return tl.float64 if torch.float64 in dtypes else tl.float32


def adamr_step_(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean, *, lr, beta1,
                beta2, eps, weight_decay, pull, l1) -> None:
    """Contiguous, validated inputs; the schema of ntkcl_fast::adamr_step_."""
    amsgrad = bool(max_exp_avg_sq)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault((p.dtype, grads[i].dtype, exp_avg[i].dtype, anchors[i].dtype), []).append(i)
    if groups:
        device = params[0].device
        hyper = torch.tensor([lr, beta1, beta2, eps, weight_decay, pull], dtype=torch.float64).to(device,
                                                                                              non_blocking=True)
        v_arg = v_mean.to(torch.float64) if v_mean is not None else hyper  # a dummy pointer without V
        for (p_dt, g_dt, s_dt, a_dt), idx in groups.items():
            lists = [[x[i] for i in idx] for x in (params, grads, exp_avg, exp_avg_sq, anchors,
                                                   max_exp_avg_sq if amsgrad else exp_avg_sq, state_steps)]
            table, programs, steps = chunk_table(lists, CHUNK, device)
            acc = _acc(p_dt, g_dt, s_dt)
            _adamr_step_kernel[(programs,)](
                table, len(idx), hyper, v_arg, L1=l1, AMSGRAD=amsgrad,
                HAS_V=v_mean is not None, P=TL_DTYPE[p_dt], G=TL_DTYPE[g_dt], S=TL_DTYPE[s_dt], A=TL_DTYPE[a_dt],
                ACC=acc, P_VIA_FP32=p_dt == torch.bfloat16 and acc == tl.float64, CHUNK=CHUNK, STEPS=steps)
    torch._foreach_add_(list(state_steps), 1)  # after the kernels (same stream), which read the old counts


def adamr_v_hat_sum(grads, exp_avg_sq, max_exp_avg_sq, state_steps, *, beta2) -> torch.Tensor:
    """Contiguous, validated inputs; the schema of ntkcl_fast::adamr_v_hat_sum (0-d fp64)."""
    amsgrad = bool(max_exp_avg_sq)
    device = grads[0].device if grads else torch.device("cpu")
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        if g.numel():
            groups.setdefault((g.dtype, exp_avg_sq[i].dtype), []).append(i)
    plans, total = [], 0
    for key, idx in groups.items():
        lists = [[x[i] for i in idx] for x in (grads, exp_avg_sq, max_exp_avg_sq if amsgrad else exp_avg_sq,
                                               state_steps)]
        table, programs, steps = chunk_table(lists, CHUNK, device)
        plans.append((key, idx, table, programs, steps, total))
        total += programs
    partials = torch.zeros(max(total, 1), dtype=torch.float64, device=device)
    beta2_t = torch.tensor([beta2], dtype=torch.float64).to(device, non_blocking=True)
    for (g_dt, s_dt), idx, table, programs, steps, first in plans:
        _v_hat_sum_kernel[(programs,)](table, len(idx), partials, first, beta2_t, AMSGRAD=amsgrad, G=TL_DTYPE[g_dt],
                                       S=TL_DTYPE[s_dt], ACC=_acc(g_dt, s_dt), CHUNK=CHUNK, STEPS=steps)
    return partials.sum()
