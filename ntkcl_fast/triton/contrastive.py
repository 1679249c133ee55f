"""Triton kernels of `ntkcl_contrastive` (forward and backward) and their host launchers.

With f_n = f / max(||f||, 1e-12) and S = f_n f_n^T / t, the value is

    L = -LSE_pos + (1/N) sum_i lse_i,
    LSE_pos = log sum_{i != j, y_i == y_j} exp(S_ij),   lse_i = log sum_{j != i} exp(S_ij),

+inf with a zero gradient when no two rows share a label (also N = 1). The value is fp32.

Forward, three launches; the outputs are those of the ntkcl_fast op of this name: (value, S
[N, N], max(||f_i||, eps) [N], LSE_pos [], lse_i [N]), fp32, kept by autograd for the backward.
1. `_nc_norm_kernel`: each program owns BM rows, walks D and writes inv_i = 1 / max(||f_i||, 1e-12)
   (fp64) and the clamped norm (fp32).
2. `_nc_lse_kernel`: each program owns BM rows and walks the column blocks; per column block it
   builds the [BM, BN] tile of S with `tl.dot` over D (ieee) scaled by both inverse norms, stores it
   (fp32), and folds it into two online (max-subtracted) log-sum-exps per row: over j != i (lse_i)
   and over the row's positive pairs (lse_pos_i; none when the row has no partner). The program
   owns whole rows, so these need no cross-program reduction and no atomics. Each log-sum-exp is
   written as the pair (m_i, log s_i) with lse_i = m_i + log s_i: 4 numbers per row, a [4, N] buffer.
3. `_nc_finish_kernel`: one program reduces the per-row pairs in a fixed order (LSE over the rows'
   positive parts, mean of lse_i), so the value is bitwise the same on every run. The
   no-positive-pair case is decided there on the device (LSE_pos = -inf -> +inf); nothing is read
   back to the host.

Backward, from the forward's outputs: G_ij = g / t * (dS_ij + dS_ji) (dS + dS^T because S is
symmetric in f_n) with dS = [i != j] e^(S_ij - lse_i) / N - [pos_ij] e^(S_ij - LSE_pos), and the row
dots rowdot_i = <f_n_i, d f_n_i> = sum_j G_ij cos_ij, as elementwise torch ops on [N, N] (the math
of csrc/ortho_math.h); g is replaced by 0 when LSE_pos = -inf, so that case gives an exactly zero
gradient without a host sync. Then one launch of `ortho._fo_grad_x_kernel` (the
feature_orthogonality one, reused): df = inv * (G f_n - f_n rowdot) in [BM, BK] tiles, `tl.dot`
over N in fp32; a row whose norm was clamped gets the plain d f_n / 1e-12 (the clamp has zero
slope), as autograd through F.normalize gives.

Why S is kept from the forward instead of recomputed: G needs lse_j of its columns, known only
after a full pass over S, so a backward from the inputs alone rebuilds S twice (statistics, then
G), 2 x 2 N^2 D fp64 flops, against N^2 * 4 bytes kept between forward and backward (256 KiB at
N = 256, a third of the fp32 features).

Precision: the S tiles are accumulated in fp64 (`tl.dot` on operands widened exactly from fp16/bf16/
fp32, fp64 inverse norms and 1/t), and the log-sum-exps and the final reductions run in fp64, so the
value is rounded to fp32 once. At t = 0.01, S = 100 cos, so rounding cos (or an inverse norm, or a
length-D fp32 dot) to fp32 moves S by 1e-6 to 1e-5, more than the fp32 ulp of a value of size 10 to
40: with fp32 tiles the value was off by 3.1e-6 at N = 33, D = 64, t = 0.01 (the test budget, 2x
eager fp32's error + 1 ulp, is 2.2e-6 there). The gradient is formed from the fp32 S, as eager and
the compiled backends form it. On A100/H100/H200 fp64 runs at half to the full fp32 FMA rate
(depending on whether Triton emits fp64 MMA), on consumer GPUs at 1/64 of it, where the dot then
dominates the forward.

Cost at N = 256, D = 768 (fp32 features 768 KiB, bf16 384 KiB; int64 labels 2 KiB): forward
2 N^2 D = 100.7 MFLOP fp64 (each row block builds its full rows, so the symmetry is not used) and
writes S (256 KiB); backward 100.7 MFLOP fp32 (G f_n) plus O(N^2) elementwise work. At this size
the kernels are latency-bound (N / BM = 16 programs), not bandwidth- or flop-bound.

Loop trip counts (D / BK, N / BN, N / FB) are compile-time constants, as in the other ortho kernels
(the Triton interpreter the tests run cannot take a run-time loop bound): one compile per feature width and per
batch-size block count, i.e. one for the training batch size and one for a short last batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ortho import EPS, _check, _fo_grad_x_kernel

BM, BN, BK = 16, 16, 32  # tl.dot needs every block dim >= 16
FB = 128  # rows per step of the fixed-order final reductions


@triton.jit
def _nc_norm_kernel(f_ptr, inv64_ptr, norm_ptr, N, D, EPS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    DT: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ss = tl.zeros((BM,), dtype=tl.float64)
    for kb in range(0, DT):
        ks = kb * BK + tl.arange(0, BK)
        f = tl.load(f_ptr + rows[:, None].to(tl.int64) * D + ks[None, :],
                    mask=(rows[:, None] < N) & (ks[None, :] < D), other=0.0).to(tl.float64)
        ss += tl.sum(f * f, axis=1)
    # F.normalize clamps the norm, so a zero row stays zero (inv = 1e12 times 0). The fp64 inverse
    # scales the S tiles; the fp32 norm is the op's output, for the backward.
    norm = tl.maximum(tl.sqrt(ss), EPS)
    tl.store(inv64_ptr + rows, 1.0 / norm, mask=rows < N)
    tl.store(norm_ptr + rows, norm.to(tl.float32), mask=rows < N)


@triton.jit
def _nc_cos_tile(f_ptr, inv_ptr, rows, cols, N, D, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 DT: tl.constexpr):
    """[BM, BN] fp64 tile of f_n f_n^T (0 outside N x N): the raw product over D, then both inverse
    norms, so f_n is never stored. The inputs widen to fp64 exactly, so every rounding here is an fp64
    one (see the module docstring for why not fp32)."""
    acc = tl.zeros((BM, BN), dtype=tl.float64)
    for kb in range(0, DT):
        ks = kb * BK + tl.arange(0, BK)
        a = tl.load(f_ptr + rows[:, None].to(tl.int64) * D + ks[None, :],
                    mask=(rows[:, None] < N) & (ks[None, :] < D), other=0.0).to(tl.float64)
        b = tl.load(f_ptr + cols[:, None].to(tl.int64) * D + ks[None, :],
                    mask=(cols[:, None] < N) & (ks[None, :] < D), other=0.0).to(tl.float64)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
    inv_r = tl.load(inv_ptr + rows, mask=rows < N, other=0.0)
    inv_c = tl.load(inv_ptr + cols, mask=cols < N, other=0.0)
    return acc * inv_r[:, None] * inv_c[None, :]


@triton.jit
def _lse_step(m, s, x, mask):
    """One online log-sum-exp step per row: (max, sum of exp(x - max)) updated with the masked tile.
    The max is replaced by 0 while a row has seen nothing (-inf), so no -inf - -inf = NaN appears."""
    x = tl.where(mask, x, float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - base) + tl.sum(tl.where(mask, tl.exp(x - base[:, None]), 0.0), axis=1)
    return m_new, s


@triton.jit
def _nc_lse_kernel(f_ptr, y_ptr, inv_ptr, stats_ptr, s_ptr, N, D, inv_t: tl.float64, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, NT: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    y_r = tl.load(y_ptr + rows, mask=rows < N)
    m_row = tl.full((BM,), float("-inf"), tl.float64)
    s_row = tl.zeros((BM,), dtype=tl.float64)
    m_pos = tl.full((BM,), float("-inf"), tl.float64)
    s_pos = tl.zeros((BM,), dtype=tl.float64)
    for cb in range(0, NT):
        cols = cb * BN + tl.arange(0, BN)
        s = _nc_cos_tile(f_ptr, inv_ptr, rows, cols, N, D, BM, BN, BK, DT) * inv_t
        y_c = tl.load(y_ptr + cols, mask=cols < N)
        valid = (rows[:, None] < N) & (cols[None, :] < N)
        tl.store(s_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], s.to(tl.float32), mask=valid)
        other = valid & (rows[:, None] != cols[None, :])
        pos = other & (y_r[:, None] == y_c[None, :])
        m_row, s_row = _lse_step(m_row, s_row, s, other)
        m_pos, s_pos = _lse_step(m_pos, s_pos, s, pos)
    # Each log-sum-exp is kept as the pair (m, log s) rather than m + log s: m is one of the S values
    # (up to 1/t = 100 in size) and log s <= log N, so consumers form S - m, which is small near the
    # row max, before anything is rounded. m = -inf marks a row with no entry (log s is then 0).
    live = rows < N
    tl.store(stats_ptr + rows, m_row, mask=live)
    tl.store(stats_ptr + N + rows, tl.log(tl.where(s_row == 0.0, 1.0, s_row)), mask=live)
    tl.store(stats_ptr + 2 * N + rows, m_pos, mask=live)
    tl.store(stats_ptr + 3 * N + rows, tl.log(tl.where(s_pos == 0.0, 1.0, s_pos)), mask=live)


@triton.jit
def _pos_total(stats_ptr, N, FB: tl.constexpr, FT: tl.constexpr):
    """LSE_pos over every ordered positive pair as (top, log_sum): top = the largest row max (-inf when
    there is no positive pair at all), LSE_pos = top + log_sum. Two passes over the rows in a fixed
    order, so every program that calls this gets the same bits."""
    m = tl.full((FB,), float("-inf"), tl.float64)
    for b in range(0, FT):
        i = b * FB + tl.arange(0, FB)
        m = tl.maximum(m, tl.load(stats_ptr + 2 * N + i, mask=i < N, other=float("-inf")))
    top = tl.max(m, axis=0)
    base = tl.where(top == float("-inf"), 0.0, top)
    acc = tl.zeros((FB,), dtype=tl.float64)
    for b in range(0, FT):
        i = b * FB + tl.arange(0, FB)
        m_i = tl.load(stats_ptr + 2 * N + i, mask=i < N, other=float("-inf"))
        ls_i = tl.load(stats_ptr + 3 * N + i, mask=i < N, other=0.0)
        acc += tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - base + ls_i))
    total = tl.sum(acc, axis=0)
    return top, tl.log(tl.where(total == 0.0, 1.0, total))


@triton.jit
def _nc_finish_kernel(stats_ptr, out_ptr, lse_pos_ptr, N, FB: tl.constexpr, FT: tl.constexpr):
    top, log_pos = _pos_total(stats_ptr, N, FB, FT)
    base = tl.where(top == float("-inf"), 0.0, top)
    # value = mean_i (m_i + log s_i) - (top + log_pos) = mean_i (m_i - top + log s_i) - log_pos: the
    # O(1/t) parts cancel before the sum, and the value is rounded to fp32 once
    acc = tl.zeros((FB,), dtype=tl.float64)
    for b in range(0, FT):
        i = b * FB + tl.arange(0, FB)
        m_i = tl.load(stats_ptr + i, mask=i < N, other=0.0)
        ls_i = tl.load(stats_ptr + N + i, mask=i < N, other=0.0)
        acc += tl.where(i < N, m_i - base + ls_i, 0.0)
    value = (tl.sum(acc, axis=0) / N - log_pos).to(tl.float32)
    # no positive pair (N = 1 included, where the row mean is -inf too): +inf, not NaN
    tl.store(out_ptr, tl.where(top == float("-inf"), float("inf"), value))
    tl.store(lse_pos_ptr, (top + log_pos).to(tl.float32))


def _labels(labels: torch.Tensor) -> torch.Tensor:
    # a bool tensor is read through a uint8 view (same bytes, no copy); integer labels as they are
    return labels.view(torch.uint8) if labels.dtype == torch.bool else labels


def _fp32(features):
    """fp16/bf16 features widened to fp32 (exact) before the fp64 dot: Triton 3.6 cannot lower an
    fp64 `tl.dot` whose operands it traces back to a 16-bit load (MMAv2 "fp64 don't support largeK"
    assertion on sm_80 / sm_90; fixed upstream after 3.6). The copy is N x D, a few hundred KB."""
    return features if features.dtype == torch.float32 else features.float()


def ntkcl_contrastive(features, labels, temperature: float):
    """Contiguous features [N >= 1, D] (fp16/bf16/fp32) and labels [N] (integer or bool) on one device;
    returns (value, S, norms, LSE_pos, lse_i) in fp32 (see the module docstring)."""
    _check(features)
    N, D = features.shape
    dev = features.device
    work = _fp32(features)
    inv64 = torch.empty(N, dtype=torch.float64, device=dev)
    norm = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.empty(4, N, dtype=torch.float64, device=dev)
    s = torch.empty(N, N, dtype=torch.float32, device=dev)
    dt = triton.cdiv(D, BK)
    _nc_norm_kernel[(triton.cdiv(N, BM),)](work, inv64, norm, N, D, EPS=EPS, BM=BM, BK=BK, DT=dt)
    _nc_lse_kernel[(triton.cdiv(N, BM),)](work, _labels(labels), inv64, stats, s, N, D, 1.0 / temperature,
                                          BM=BM, BN=BN, BK=BK, DT=dt, NT=triton.cdiv(N, BN))
    out = torch.empty(2, dtype=torch.float32, device=dev)
    _nc_finish_kernel[(1,)](stats, out, out[1:], N, FB=FB, FT=triton.cdiv(N, FB))
    return out[0].clone(), s, norm, out[1].clone(), (stats[0] + stats[1]).to(torch.float32)


def ntkcl_contrastive_backward(grad_output, s, f_norm, lse_pos, lse_row, features, labels, temperature: float):
    """d value / d features, in the features' dtype and shape; grad_output is a 0-d device tensor."""
    _check(features)
    N, D = features.shape
    work = _fp32(features)
    off = ~torch.eye(N, dtype=torch.bool, device=features.device)
    pos = (labels[:, None] == labels[None, :]) & off
    zero = s.new_zeros(())
    p_row = torch.where(off, torch.exp(s - lse_row[:, None]), zero)
    p_pos = torch.where(pos, torch.exp(s - lse_pos), zero)
    go = torch.where(torch.isneginf(lse_pos), zero, grad_output.to(torch.float32))
    ds = (p_row / N - p_pos) * go
    g = ((ds + ds.T) / temperature).contiguous()
    rowdot = (g * s).sum(1).mul_(temperature).reshape(1, N)  # sum_j G_ij cos_ij, cos = t S
    inv = torch.where(f_norm > EPS, f_norm.reciprocal(), 1.0 / EPS)
    df = torch.empty_like(features)
    _fo_grad_x_kernel[(triton.cdiv(N, BM), triton.cdiv(D, BK))](
        g, N, 1, work, work, df, rowdot, inv, inv, N, N, D,
        NORMALIZE=True, EPS=EPS, BM=BM, BD=BK, BC=BN, CT=triton.cdiv(N, BN), PARTS=1)
    return df
