"""Triton kernels of `feature_orthogonality` (forward and backward) and their host launchers.

Forward, one launch: each program owns a [BM, BN] tile of S = f @ p^T; it walks D once,
accumulating the tile product with `tl.dot` (fp32 accumulation) and the squared row norms of
both sides from the same loaded tiles, so normalization, product, square and reduction are one
pass. Each program writes one partial sum (added in a fixed order), its tile of S and, from the
first tile row / column, the clamped row norms: the op's outputs, which the backward takes back.

The loop trip counts (D / BK, K / BN, B / BN) are compile-time constants: one compile per
feature width and class count, which stay fixed through training.

Backward, two launches (one when a side is frozen), from S and the norms of the forward:
G = dL/dS = c S and the row dots <dL/dn_f, n_f> = sum_k G_ik S_ik (per prototype likewise) are
elementwise torch ops on [B, K]; then
  df = inv_f * (G' @ p - n_f * rowdot_f)  (tiles of [BM, BD], `tl.dot` over K, G' = G / |p|),
  dp likewise with G^T and f.
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
    column indices, validity mask and clamped row norms (1 when not normalizing)."""
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
        norm_f = tl.maximum(tl.sqrt(fss), EPS)
        norm_p = tl.maximum(tl.sqrt(pss), EPS)
    else:
        norm_f = tl.full((BM,), 1.0, tl.float32)
        norm_p = tl.full((BN,), 1.0, tl.float32)
    s = acc * (1.0 / norm_f)[:, None] * (1.0 / norm_p)[None, :]
    valid = (rows[:, None] < B) & (cols[None, :] < K)
    s = tl.where(valid, s, 0.0)
    return s, rows, cols, valid, norm_f, norm_p


@triton.jit
def _fo_fwd_kernel(f_ptr, p_ptr, partials, s_ptr, f_norm_ptr, p_norm_ptr, B, K, D, NORMALIZE: tl.constexpr,
                   EPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    s, rows, cols, valid, norm_f, norm_p = _cosine_tile(f_ptr, p_ptr, B, K, D, NORMALIZE, EPS, BM, BN, BK, KT)
    tl.store(partials + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(s * s, axis=1), axis=0))
    tl.store(s_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], s, mask=valid)
    if pid_n == 0:
        tl.store(f_norm_ptr + rows, norm_f, mask=rows < B)
    if pid_m == 0:
        tl.store(p_norm_ptr + cols, norm_p, mask=cols < K)


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
            raise RuntimeError("the triton backend of the ortho losses runs fp16/bf16/fp32 inputs, not fp64; "
                               "use backend='cpu'/'cuda'/'torch' (or 'auto') for fp64")


def _inverse(norm: torch.Tensor) -> torch.Tensor:
    """1 / norm, exactly 1 / EPS for a clamped norm: `_fo_grad_x_kernel` tells clamped rows by that value."""
    return torch.where(norm > EPS, norm.reciprocal(), 1.0 / EPS)


def feature_orthogonality(features, prototypes, normalize: bool, mean: bool):
    """(value, S [B, K], max(||f_i||, eps) [B], max(||p_k||, eps) [K]) in fp32 (norms 1 when not
    normalizing): the outputs of the ntkcl_fast op of this name."""
    _check(features, prototypes)
    B, D = features.shape
    K = prototypes.shape[0]
    dev = features.device
    grid = (triton.cdiv(B, BM), triton.cdiv(K, BN))
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=dev)
    s = torch.empty(B, K, dtype=torch.float32, device=dev)
    f_norm = torch.empty(B, dtype=torch.float32, device=dev)
    p_norm = torch.empty(K, dtype=torch.float32, device=dev)
    _fo_fwd_kernel[grid](features, prototypes, partials, s, f_norm, p_norm, B, K, D, NORMALIZE=normalize, EPS=EPS,
                         BM=BM, BN=BN, BK=BK, KT=triton.cdiv(D, BK))
    total = partials.sum()
    return total / (B * K) if mean else total, s, f_norm, p_norm


def feature_orthogonality_backward(grad_output, s, f_norm, p_norm, features, prototypes, normalize: bool,
                                   mean: bool, features_grad: bool, prototypes_grad: bool):
    """(df, dp); a side that needs no gradient skips its launch and comes back empty."""
    _check(features, prototypes)
    B, D = features.shape
    K = prototypes.shape[0]
    g = s * (grad_output.to(torch.float32) * (2.0 / (B * K) if mean else 2.0))  # dL/dS, read on device
    gs = g * s
    # one row-dot part per row ([1, B] and [1, K]): summed by torch, in a fixed order
    rowdot_f, rowdot_p = gs.sum(1).reshape(1, B), gs.sum(0).reshape(1, K)
    inv_f, inv_p = _inverse(f_norm), _inverse(p_norm)
    df, dp = features.new_empty((0,)), prototypes.new_empty((0,))
    if features_grad:
        df = torch.empty_like(features)
        _fo_grad_x_kernel[(triton.cdiv(B, BM), triton.cdiv(D, BK))](
            g, K, 1, prototypes, features, df, rowdot_f, inv_f, inv_p, B, K, D,
            NORMALIZE=normalize, EPS=EPS, BM=BM, BD=BK, BC=BN, CT=triton.cdiv(K, BN), PARTS=1)
    if prototypes_grad:
        dp = torch.empty_like(prototypes)
        _fo_grad_x_kernel[(triton.cdiv(K, BM), triton.cdiv(D, BK))](
            g, 1, K, features, prototypes, dp, rowdot_p, inv_p, inv_f, K, B, D,
            NORMALIZE=normalize, EPS=EPS, BM=BM, BD=BK, BC=BN, CT=triton.cdiv(B, BN), PARTS=1)
    return df, dp
