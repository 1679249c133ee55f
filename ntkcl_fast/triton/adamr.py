"""Triton AdamR step: one launch per dtype combination for the whole parameter list."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._table import TL_DTYPE, chunk_table, find_tensor

CHUNK = 4096


@triton.jit
def _adamr_kernel(table, count, hyper, L1: tl.constexpr, P: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
                  A: tl.constexpr, ACC: tl.constexpr, P_VIA_FP32: tl.constexpr, CHUNK: tl.constexpr,
                  STEPS: tl.constexpr):
    pid = tl.program_id(0)
    t = find_tensor(table + 6 * count, count, pid, STEPS)
    p_ptr = tl.load(table + t).to(tl.pointer_type(P))
    g_ptr = tl.load(table + count + t).to(tl.pointer_type(G))
    m_ptr = tl.load(table + 2 * count + t).to(tl.pointer_type(S))
    v_ptr = tl.load(table + 3 * count + t).to(tl.pointer_type(S))
    a_ptr = tl.load(table + 4 * count + t).to(tl.pointer_type(A))
    n = tl.load(table + 5 * count + t)
    offs = (pid - tl.load(table + 6 * count + t)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    lr = tl.load(hyper).to(ACC)
    beta1 = tl.load(hyper + 1).to(ACC)
    beta2 = tl.load(hyper + 2).to(ACC)
    eps = tl.load(hyper + 3).to(ACC)
    wd = tl.load(hyper + 4).to(ACC)
    pull = tl.load(hyper + 5).to(ACC)
    step_size = tl.load(hyper + 6).to(ACC)     # lr / bc1
    inv_sqrt_bc2 = tl.load(hyper + 7).to(ACC)  # 1 / sqrt(bc2)
    p = tl.load(p_ptr + offs, mask=mask).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    m = beta1 * tl.load(m_ptr + offs, mask=mask).to(ACC) + (1 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask).to(ACC) + (1 - beta2) * g * g
    diff = p - tl.load(a_ptr + offs, mask=mask).to(ACC)
    if L1:
        diff = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(ACC)
    p = p - lr * (wd * p + pull * diff)
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    tl.store(m_ptr + offs, m.to(S), mask=mask)
    tl.store(v_ptr + offs, v.to(S), mask=mask)
    if P_VIA_FP32:
        p = p.to(tl.float32)
    tl.store(p_ptr + offs, p.to(P), mask=mask)


def adamr_step_(params, grads, exp_avg, exp_avg_sq, anchors, hyper: list[float], l1: bool) -> None:
    """Contiguous, validated inputs; `hyper` = [lr, beta1, beta2, eps, wd, pull, lr / bc1, 1 / sqrt(bc2)]."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault((p.dtype, grads[i].dtype, exp_avg[i].dtype, anchors[i].dtype), []).append(i)
    if not groups:
        return
    device = params[0].device
    hyper_t = torch.tensor(hyper, dtype=torch.float64).to(device, non_blocking=True)
    for (p_dt, g_dt, s_dt, a_dt), idx in groups.items():
        lists = [[x[i] for i in idx] for x in (params, grads, exp_avg, exp_avg_sq, anchors)]
        table, programs, steps = chunk_table(lists, CHUNK, device)
        acc = tl.float64 if torch.float64 in (p_dt, g_dt, s_dt) else tl.float32
        _adamr_kernel[(programs,)](table, len(idx), hyper_t, L1=l1, P=TL_DTYPE[p_dt], G=TL_DTYPE[g_dt],
                                   S=TL_DTYPE[s_dt], A=TL_DTYPE[a_dt], ACC=acc,
                                   P_VIA_FP32=p_dt == torch.bfloat16 and acc == tl.float64,
                                   CHUNK=CHUNK, STEPS=steps)
