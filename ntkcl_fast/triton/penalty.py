"""Triton L2 / EWC kernels: one launch per dtype combination for the whole list.

Each program owns one CHUNK of one tensor; it writes its partial sum (fp64) to its own slot,
and the slots are reduced afterwards in a fixed order, so the value is the same on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._table import TL_DTYPE, chunk_table, find_tensor

CHUNK = 4096


@triton.jit
def _l2_kernel(table, count, partials, first_partial, coef_ptr,
               HAS_F: tl.constexpr, HAS_G: tl.constexpr, ACCUMULATE: tl.constexpr,
               P: tl.constexpr, A: tl.constexpr, F: tl.constexpr, G: tl.constexpr, ACC: tl.constexpr,
               G_VIA_FP32: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr):
    pid = tl.program_id(0)
    rows = 2 + HAS_F + HAS_G
    t = find_tensor(table + (rows + 1) * count, count, pid, STEPS)
    p_ptr = tl.load(table + t).to(tl.pointer_type(P))
    a_ptr = tl.load(table + count + t).to(tl.pointer_type(A))
    n = tl.load(table + rows * count + t)
    offs = (pid - tl.load(table + (rows + 1) * count + t)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    d = tl.load(p_ptr + offs, mask=mask).to(ACC) - tl.load(a_ptr + offs, mask=mask).to(ACC)
    if HAS_F:
        f_ptr = tl.load(table + 2 * count + t).to(tl.pointer_type(F))
        fd = tl.load(f_ptr + offs, mask=mask).to(ACC) * d
    else:
        fd = d
    q = tl.where(mask, fd * d, 0.0)
    tl.store(partials + first_partial + pid, tl.sum(q.to(tl.float64), axis=0))
    if HAS_G:
        g_ptr = tl.load(table + (2 + HAS_F) * count + t).to(tl.pointer_type(G))
        g = tl.load(coef_ptr).to(ACC) * fd
        if ACCUMULATE:
            g = g + tl.load(g_ptr + offs, mask=mask).to(ACC)
        if G_VIA_FP32:
            g = g.to(tl.float32)
        tl.store(g_ptr + offs, g.to(G), mask=mask)


def _acc(*dtypes):
    return tl.float64 if torch.float64 in dtypes else tl.float32


def l2_penalty(params, anchors, importance, scale: float, grads, grad_output, accumulate: bool) -> torch.Tensor:
    """Contiguous, validated inputs; `importance` [] for F = 1; `grads` None for the value only.

    Returns the 0-d fp32 value; writes grads[i] (+)= 2 * scale * F_i * (p_i - a_i) * grad_output.
    """
    device = params[0].device
    has_f, has_g = bool(importance), grads is not None
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.numel():
            key = (p.dtype, anchors[i].dtype, importance[i].dtype if has_f else None,
                   grads[i].dtype if has_g else None)
            groups.setdefault(key, []).append(i)
    plans, total = [], 0
    for key, idx in groups.items():
        lists = [[params[i] for i in idx], [anchors[i] for i in idx]]
        if has_f:
            lists.append([importance[i] for i in idx])
        if has_g:
            lists.append([grads[i] for i in idx])
        table, programs, steps = chunk_table(lists, CHUNK, device)
        plans.append((key, idx, table, programs, steps, total))
        total += programs
    partials = torch.zeros(max(total, 1), dtype=torch.float64, device=device)
    # 2 * scale * grad_output, kept on device (no host sync on the grad_output of a backward)
    if grad_output is not None:
        coef_t = (2.0 * scale) * grad_output.to(torch.float64).reshape(1)
    else:
        coef_t = torch.tensor([2.0 * scale], dtype=torch.float64).to(device, non_blocking=True)
    for (p_dt, a_dt, f_dt, g_dt), idx, table, programs, steps, first in plans:
        acc = _acc(*(dt for dt in (p_dt, a_dt, f_dt, g_dt) if dt is not None))
        _l2_kernel[(programs,)](
            table, len(idx), partials, first, coef_t,
            HAS_F=has_f, HAS_G=has_g, ACCUMULATE=accumulate,
            P=TL_DTYPE[p_dt], A=TL_DTYPE[a_dt], F=TL_DTYPE[f_dt or p_dt], G=TL_DTYPE[g_dt or p_dt], ACC=acc,
            G_VIA_FP32=g_dt == torch.bfloat16 and acc == tl.float64, CHUNK=CHUNK, STEPS=steps)
    # fixed-order sum of the partial sums (a single-tensor torch sum of a fixed shape)
    return (partials.sum() * scale).to(torch.float32)


@triton.jit
def _fisher_kernel(table, count, scalars, FI: tl.constexpr, GR: tl.constexpr, ACC: tl.constexpr,
                   VIA_FP32: tl.constexpr, CHUNK: tl.constexpr, STEPS: tl.constexpr):
    pid = tl.program_id(0)
    t = find_tensor(table + 3 * count, count, pid, STEPS)
    f_ptr = tl.load(table + t).to(tl.pointer_type(FI))
    g_ptr = tl.load(table + count + t).to(tl.pointer_type(GR))
    n = tl.load(table + 2 * count + t)
    offs = (pid - tl.load(table + 3 * count + t)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    f = tl.load(f_ptr + offs, mask=mask).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    out = tl.load(scalars + 1).to(ACC) * f + tl.load(scalars).to(ACC) * (g * g)
    if VIA_FP32:
        out = out.to(tl.float32)
    tl.store(f_ptr + offs, out.to(FI), mask=mask)


def fisher_accumulate_(fisher, grads, scale: float, decay: float) -> None:
    groups: dict[tuple, list[int]] = {}
    for i, (f, g) in enumerate(zip(fisher, grads)):
        if f.numel():
            groups.setdefault((f.dtype, g.dtype), []).append(i)
    scalars = torch.tensor([scale, decay], dtype=torch.float64).to(fisher[0].device, non_blocking=True)
    for (f_dt, g_dt), idx in groups.items():
        table, programs, steps = chunk_table([[fisher[i] for i in idx], [grads[i] for i in idx]], CHUNK,
                                             fisher[0].device)
        acc = _acc(f_dt, g_dt)
        _fisher_kernel[(programs,)](table, len(idx), scalars, FI=TL_DTYPE[f_dt],
                                    GR=TL_DTYPE[g_dt], ACC=acc,
                                    VIA_FP32=f_dt == torch.bfloat16 and acc == tl.float64,
                                    CHUNK=CHUNK, STEPS=steps)
