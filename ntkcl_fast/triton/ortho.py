"""Triton kernels of `feature_orthogonality` (forward and backward) and their host launchers.

Forward, one launch: each program owns a [BM, BN] tile of S = f @ p^T; it walks D once,
accumulating the tile product with `tl.dot` (fp32 accumulation) and the squared row norms of
both sides from the same loaded tiles, so normalization, product, square and reduction are one
pass. Each program writes one partial sum; the partials are added in a fixed order.

The loop trip counts (D / BK, K / BN, B / BN) are compile-time constants: one compile per
feature width and class count, which stay fixed through training.

Backward, three launches (two when one side is frozen), nothing kept from the forward but the inputs:
1. recompute each S tile as above; write G = dL/dS (a B x K fp32 scratch) and each tile's part of
   the row dots <dL/dn_f, n_f> = sum_k G_ik S_ik (and per prototype) to its own slot of a
   [K / BN, B] (and [B / BM, K]) fp32 buffer: no float atomics;
2. df = inv_f * (G' @ p - n_f * rowdot_f)  (tiles of [BM, BD], `tl.dot` over K), the row dot
   summed from its parts in a fixed order, so the gradient is the same on every run;
3. dp likewise with G^T and f.
Row norms are clamped at 1e-12 (torch.nn.functional.normalize); a clamped row gets the plain
dn / 1e-12 gradient, as autograd gives.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-12
BM, BN, BK = 16, 16, 32  # tl.dot needs every block dim >= 16


@triton.jit
def _cosine_tile(f_ptr, p_ptr, B, K, D, NORMALIZE: tl.constexpr, EPS: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr):
    """This program's [BM, BN] tile of S = norm(f) @ norm(p).T (zero outside B x K), with its row and
    column indices, validity mask and inverse row norms (1 when not normalizing)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    fss = tl.zeros((BM,), dtype=tl.float32)
    pss = tl.zeros((BN,), dtype=tl.float32)
    for kb in range(0, KT):
        ks = kb * BK + tl.arange(0, BK)
        f = tl.load(f_ptr + rows[:, None].to(tl.int64) * D + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < D), other=0.0).to(tl.float32)
        p = tl.load(p_ptr + cols[:, None].to(tl.int64) * D + ks[None, :],
                    mask=(cols[:, None] < K) & (ks[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.dot(f, tl.trans(p), input_precision="ieee")
        if NORMALIZE:
            fss += tl.sum(f * f, axis=1)
            pss += tl.sum(p * p, axis=1)
    if NORMALIZE:
        inv_f = 1.0 / tl.maximum(tl.sqrt(fss), EPS)
        inv_p = 1.0 / tl.maximum(tl.sqrt(pss), EPS)
    else:
        inv_f = tl.full((BM,), 1.0, tl.float32)
        inv_p = tl.full((BN,), 1.0, tl.float32)
    s = acc * inv_f[:, None] * inv_p[None, :]
    valid = (rows[:, None] < B) & (cols[None, :] < K)
    s = tl.where(valid, s, 0.0)
    return s, rows, cols, valid, inv_f, inv_p


@triton.jit
def _fo_fwd_kernel(f_ptr, p_ptr, partials, B, K, D, NORMALIZE: tl.constexpr, EPS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    s, rows, cols, valid, inv_f, inv_p = _cosine_tile(f_ptr, p_ptr, B, K, D, NORMALIZE, EPS, BM, BN, BK, KT)
    tl.store(partials + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(s * s, axis=1), axis=0))


@triton.jit
def _fo_grad_s_kernel(f_ptr, p_ptr, g_ptr, rowdot_f, rowdot_p, inv_f_ptr, inv_p_ptr, coef_ptr, B, K, D,
                      NORMALIZE: tl.constexpr, EPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, KT: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    s, rows, cols, valid, inv_f, inv_p = _cosine_tile(f_ptr, p_ptr, B, K, D, NORMALIZE, EPS, BM, BN, BK, KT)
    g = s * tl.load(coef_ptr)  # dL/dS = 2 c grad_output S
    tl.store(g_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], g, mask=valid)
    if NORMALIZE:
        gs = g * s
        tl.store(rowdot_f + pid_n * B + rows, tl.sum(gs, axis=1), mask=rows < B)
        tl.store(rowdot_p + pid_m * K + cols, tl.sum(gs, axis=0), mask=cols < K)
        if pid_n == 0:
            tl.store(inv_f_ptr + rows, inv_f, mask=rows < B)
        if pid_m == 0:
            tl.store(inv_p_ptr + cols, inv_p, mask=cols < K)


@triton.jit
def _fo_grad_x_kernel(g_ptr, g_stride_r, g_stride_c, y_ptr, x_ptr, out_ptr, rowdot, inv_x_ptr, inv_y_ptr,
                      R, C, D, NORMALIZE: tl.constexpr, EPS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                      BC: tl.constexpr, CT: tl.constexpr, PARTS: tl.constexpr):
    """out[R, D] = inv_x * (sum_c G[r, c] inv_y[c] y[c, :] - n_x * rowdot) (normalized), G @ y otherwise;
    rowdot [PARTS, R] is summed over its parts in order."""
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ds = pid_d * BD + tl.arange(0, BD)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for cb in range(0, CT):
        cs = cb * BC + tl.arange(0, BC)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * g_stride_r + cs[None, :].to(tl.int64) * g_stride_c,
                    mask=(rows[:, None] < R) & (cs[None, :] < C), other=0.0)
        if NORMALIZE:
            g = g * tl.load(inv_y_ptr + cs, mask=cs < C, other=0.0)[None, :]
        y = tl.load(y_ptr + cs[:, None].to(tl.int64) * D + ds[None, :],
                    mask=(cs[:, None] < C) & (ds[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.dot(g, y, input_precision="ieee")
    mask = (rows[:, None] < R) & (ds[None, :] < D)
    if NORMALIZE:
        inv_x = tl.load(inv_x_ptr + rows, mask=rows < R, other=1.0)
        live = inv_x < 1.0 / EPS
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        dot = tl.zeros((BM,), dtype=tl.float32)
        for part in range(0, PARTS):
            dot += tl.load(rowdot + part * R + rows, mask=rows < R, other=0.0)
        dot = tl.where(live, dot, 0.0)
        acc = (acc - x * inv_x[:, None] * dot[:, None]) * inv_x[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(*tensors):
    for t in tensors:
        if t.dtype == torch.float64:
            raise TypeError("the triton backend of the ortho losses runs fp16/bf16/fp32 inputs; "
                            "use backend='cpu'/'cuda'/'torch' for fp64")


def feature_orthogonality(features, prototypes, normalize: bool, mean: bool) -> torch.Tensor:
    _check(features, prototypes)
    B, D = features.shape
    K = prototypes.shape[0]
    grid = (triton.cdiv(B, BM), triton.cdiv(K, BN))
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=features.device)
    _fo_fwd_kernel[grid](features, prototypes, partials, B, K, D, NORMALIZE=normalize, EPS=EPS, BM=BM, BN=BN, BK=BK, KT=triton.cdiv(D, BK))
    total = partials.sum()
    return total / (B * K) if mean else total


def feature_orthogonality_backward(grad_output, features, prototypes, normalize: bool, mean: bool,
                                   features_grad: bool, prototypes_grad: bool):
    """(df, dp); a side that needs no gradient skips its launch and comes back as None."""
    _check(features, prototypes)
    B, D = features.shape
    K = prototypes.shape[0]
    dev = features.device
    coef = (grad_output.to(torch.float32) * (2.0 / (B * K) if mean else 2.0)).reshape(1).contiguous()
    g = torch.empty(B, K, dtype=torch.float32, device=dev)
    m_tiles, n_tiles = triton.cdiv(B, BM), triton.cdiv(K, BN)
    rowdot_f = torch.empty(n_tiles, B, dtype=torch.float32, device=dev)  # one part per tile column
    rowdot_p = torch.empty(m_tiles, K, dtype=torch.float32, device=dev)
    inv_f = torch.empty(B, dtype=torch.float32, device=dev)
    inv_p = torch.empty(K, dtype=torch.float32, device=dev)
    _fo_grad_s_kernel[(m_tiles, n_tiles)](
        features, prototypes, g, rowdot_f, rowdot_p, inv_f, inv_p, coef, B, K, D,
        NORMALIZE=normalize, EPS=EPS, BM=BM, BN=BN, BK=BK, KT=triton.cdiv(D, BK))
    df = dp = None
    if features_grad:
        df = torch.empty_like(features)
        _fo_grad_x_kernel[(triton.cdiv(B, BM), triton.cdiv(D, BK))](
            g, K, 1, prototypes, features, df, rowdot_f, inv_f, inv_p, B, K, D,
            NORMALIZE=normalize, EPS=EPS, BM=BM, BD=BK, BC=BN, CT=n_tiles, PARTS=n_tiles)
    if prototypes_grad:
        dp = torch.empty_like(prototypes)
        _fo_grad_x_kernel[(triton.cdiv(K, BM), triton.cdiv(D, BK))](
            g, 1, K, features, prototypes, dp, rowdot_p, inv_p, inv_f, K, B, D,
            NORMALIZE=normalize, EPS=EPS, BM=BM, BD=BK, BC=BN, CT=triton.cdiv(B, BN), PARTS=m_tiles)
    return df, dp
