"""Triton kernels of `gram_orthogonality` (CODA-Prompt) and `cross_orthogonality` (O-LoRA) over
lists of layers, and their host launchers.

Both losses are sums over layers of a function of a small product: G_l = W_l W_l^T [N_l, N_l]
(minus I) or P_l = A_l B_l^T [r_l, s_l], with D_l (768..4096) much larger than N_l, r_l, s_l
(8..100). Every launch covers the whole list: a launch table (one int64 device tensor, built on
the host and copied once per call for all launches of that call) holds per layer its data
pointers, sizes, scratch offset and first program id, and each program finds its layer by a
binary search over the first program ids (`_table.find_tensor`). The element type is a
compile-time constant, so a list launches once per dtype (once per (old, new) dtype pair for
`cross_orthogonality`); a list of one dtype is one launch per stage. Sizes are read from the
table, so the loops over D (and over N or s in the backward) run each layer's own trip count, and
one compiled kernel serves every list of a dtype. They are `while` loops: Triton's interpreter
(the CPU test path) turns every non-constexpr scalar into a 1-element array that `range` cannot
take under NumPy >= 2.4, while `while` compiles to the same runtime loop on GPU. Triton does not
software-pipeline a `while`, so each step loads a wide [16, BK = 128] slab of both operands to keep
enough bytes in flight.

Forward, one launch (per dtype group). Each program owns one [BT, BT] tile of one layer's
product and walks D in steps of BK with `tl.dot` (fp32 accumulation, `input_precision="ieee"`),
then writes the tile's share of the value to its own slot of a partials buffer, and the tile of
the value's derivative in the product (the op's second output, which the backward takes back):
E_l = 4 c_l (G_l - I) (c_l = 1/N_l^2 for "mean", 1 for "sum"), tile and mirror, or
M_l = sign(P_l) (l1; sign(0) = 0, as torch.abs's gradient) / 2 P_l (fro2), into the layer's block
of one flat fp32 buffer of sum_l N_l^2 (or sum_l r_l s_l) floats. G is symmetric, so only the
tiles on and below the diagonal are computed (T(T+1)/2 programs for T = cdiv(N, BT)) and the
off-diagonal ones count twice. The slots are added by one torch sum of a fixed shape afterwards:
the value is deterministic, there are no float atomics.

Backward, one launch (per dtype group) after scaling the forward's derivative buffer by
grad_output (one elementwise op, read on device: no host sync): gradient panels, each program
owns a [BM, BD] tile of one output and accumulates scratch-matrix @ input over the small
dimension: dW = E W, dA = M B, dB = M^T A (M^T read through swapped strides). One launch covers
every layer and both sides of the cross loss; a side whose gradient is not needed (O-LoRA's frozen
old matrices) gets no programs.

Minimum bytes and flops (fp32 inputs; half the bytes for fp16/bf16), and what this code moves.
Tiles of one layer re-read by its other programs, and stage 2's re-read of the inputs, should hit L2
at these sizes (a few MB against H200's 50 MB L2), so HBM traffic stays near the minimum:
- O-LoRA, 24 layers, r = s = 8, D = 4096. Forward: read 24 * (8 + 8) * 4096 * 4 B = 6.29 MB,
  2 r s D * 24 = 12.6 MFLOP, 24 programs (one tile each), 24 partials. Backward: read 6.29 MB,
  write dB 3.15 MB (old frozen) or dA and dB 6.29 MB; 12.6 MFLOP per side; the derivative buffer
  24 * 64 floats (6 KB), written by the forward.
- CODA-P, 5 x [10, 768]. Forward: read 5 * 10 * 768 * 4 B = 154 KB, 2 N^2 D * 5 = 0.77 MFLOP
  (0.42 using the symmetry); 5 programs. Backward: read 154 KB, write 154 KB, 0.42 + 0.77
  MFLOP; derivative buffer 5 * 100 floats. The 16 x 16 tiles do 2.0 MFLOP of dot work per pass for N = 10
  (padding), but masked loads read no padding bytes.
At HBM speed (4.8 TB/s) the O-LoRA forward is about 1.3 us of traffic and CODA-P's is noise: both
are bound by launch and host overhead, hence one launch per list and stage, and one table copy
per call. Keeping the derivative buffer from the forward (a few KB) saves the backward a
second read of every input and one launch, against recomputing the products.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._table import TL_DTYPE, find_tensor
from .ortho import _check

BT = 16   # product tile [BT, BT]; tl.dot needs every block dim >= 16
BK = 128  # step over D in the product: a [16, 128] slab of each operand per step
BM = 16   # gradient tile rows
BD = 64   # gradient tile columns (along D)
BC = 16   # step over the small dimension (N, r or s) in the gradient
_ALIGN = 2  # sub-tables start on 16-byte boundaries, so every launch sees the same pointer alignment


# ----------------------------------------------------------------------------- device code

@triton.jit
def _product_tile(a_ptr, b_ptr, rows, cols, R, C, D, BT: tl.constexpr, BK: tl.constexpr):
    """[BT, BT] fp32 tile A[rows] @ B[cols]^T of A [R, D], B [C, D]; zero outside R x C."""
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    a_rows = a_ptr + rows[:, None].to(tl.int64) * D
    b_rows = b_ptr + cols[:, None].to(tl.int64) * D
    k0 = 0
    while k0 < D:  # this layer's own trip count (see the module docstring for why `while`)
        ks = k0 + tl.arange(0, BK)
        a = tl.load(a_rows + ks[None, :], mask=(rows[:, None] < R) & (ks[None, :] < D), other=0.0).to(tl.float32)
        b = tl.load(b_rows + ks[None, :], mask=(cols[:, None] < C) & (ks[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        k0 += BK
    return acc


@triton.jit
def _gram_tiles_kernel(table, count, partials, d_gram, MEAN: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr, STEPS: tl.constexpr):
    """Table rows: W pointer, N, D, d_gram offset, first program. One program per tile on or below
    the diagonal of G = W W^T: partials[pid] = weighted sum of (G - I)^2 over the tile, and
    E = 4 c (G - I) into the layer's [N, N] block of d_gram, tile and mirror."""
    pid = tl.program_id(0)
    t = find_tensor(table + 4 * count, count, pid, STEPS)
    w = tl.load(table + t).to(tl.pointer_type(W))
    n = tl.load(table + count + t)
    d = tl.load(table + 2 * count + t)
    k = pid - tl.load(table + 4 * count + t)
    # tile index k -> (ti, tj) with tj <= ti, row-major over the lower triangle: k = ti(ti+1)/2 + tj.
    # The float root can be one off either way (approximate sqrt); the two fixes make it exact.
    ti = ((tl.sqrt(8.0 * k.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    ti = tl.where(ti * (ti + 1) // 2 > k, ti - 1, ti)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= k, ti + 1, ti)
    tj = k - ti * (ti + 1) // 2
    rows = ti * BT + tl.arange(0, BT)
    cols = tj * BT + tl.arange(0, BT)
    valid = (rows[:, None] < n) & (cols[None, :] < n)
    # Outside the layer the tile is zero rows times real rows: 0 * inf = NaN where a weight is
    # infinite, so the padding is masked out rather than trusted to be 0.
    e = tl.where(valid, _product_tile(w, w, rows, cols, n, n, d, BT, BK), 0.0)
    e = e - tl.where((rows[:, None] == cols[None, :]) & (rows[:, None] < n), 1.0, 0.0)
    if MEAN:
        nf = n.to(tl.float32)
        coef = 1.0 / (nf * nf)
    else:
        coef = 1.0
    weight = tl.where(ti == tj, 1.0, 2.0) * coef
    tl.store(partials + pid, tl.sum(tl.sum(e * e, axis=1), axis=0) * weight)
    e = e * (4.0 * coef)
    block = d_gram + tl.load(table + 3 * count + t)
    tl.store(block + rows[:, None] * n + cols[None, :], e, mask=valid)
    # G is symmetric: the tile above the diagonal is this one transposed (same values, swapped addresses)
    if ti != tj:  # a branch, not a mask term: Triton 3.9's interpreter widens `mask & scalar` to int64
        tl.store(block + cols[None, :] * n + rows[:, None], e, mask=valid)


@triton.jit
def _cross_tiles_kernel(table, count, partials, d_products, L1: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr):
    """Table rows: A pointer, B pointer, r, s, D, d_products offset, first program. One program per
    tile of P = A B^T [r, s]: partials[pid] = sum |P| (l1) or P^2 over the tile, and M = sign(P) or
    2 P into the layer's [r, s] block of d_products."""
    pid = tl.program_id(0)
    t = find_tensor(table + 6 * count, count, pid, STEPS)
    a = tl.load(table + t).to(tl.pointer_type(A))
    b = tl.load(table + count + t).to(tl.pointer_type(B))
    r = tl.load(table + 2 * count + t)
    s = tl.load(table + 3 * count + t)
    d = tl.load(table + 4 * count + t)
    k = pid - tl.load(table + 6 * count + t)
    tiles_s = tl.cdiv(s, BT)
    rows = (k // tiles_s) * BT + tl.arange(0, BT)
    cols = (k % tiles_s) * BT + tl.arange(0, BT)
    valid = (rows[:, None] < r) & (cols[None, :] < s)
    p = tl.where(valid, _product_tile(a, b, rows, cols, r, s, d, BT, BK), 0.0)  # padding: see the gram kernel
    if L1:
        v = tl.abs(p)
        m = tl.where(p > 0, 1.0, tl.where(p < 0, -1.0, 0.0))
    else:
        v = p * p
        m = p * 2.0
    tl.store(partials + pid, tl.sum(tl.sum(v, axis=1), axis=0))
    block = d_products + tl.load(table + 5 * count + t)
    tl.store(block + rows[:, None] * s + cols[None, :], m, mask=valid)


@triton.jit
def _panel(m_ptr, m_sr, m_sc, y_ptr, out_ptr, rows, k_d, R, C, D, BM: tl.constexpr, BC: tl.constexpr,
           BD: tl.constexpr):
    """out[rows, d-tile k_d] = M[rows, :C] @ Y[:C, d-tile], M fp32 with strides (m_sr, m_sc), Y [C, D]."""
    ds = k_d * BD + tl.arange(0, BD)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    c0 = 0
    while c0 < C:
        cs = c0 + tl.arange(0, BC)
        m = tl.load(m_ptr + rows[:, None] * m_sr + cs[None, :] * m_sc, mask=(rows[:, None] < R) & (cs[None, :] < C),
                    other=0.0)
        y = tl.load(y_ptr + cs[:, None] * D + ds[None, :], mask=(cs[:, None] < C) & (ds[None, :] < D),
                    other=0.0).to(tl.float32)
        acc += tl.dot(m, y, input_precision="ieee")
        c0 += BC
    tl.store(out_ptr + rows[:, None] * D + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < R) & (ds[None, :] < D))


@triton.jit
def _grad_panels_kernel(table, count, scratch, X: tl.constexpr, Y: tl.constexpr, MIXED: tl.constexpr,
                        BM: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, STEPS: tl.constexpr):
    """Table rows (one column per job = one output tensor): out pointer, Y pointer, scratch offset,
    M row stride, M column stride, R, C, D, side, first program. Side 0 writes an X tensor from a Y
    input, side 1 a Y tensor from an X input: the two sides of the cross loss when old (X) and new
    (Y) differ in dtype (MIXED). Without MIXED, X == Y and the side does not matter."""
    pid = tl.program_id(0)
    t = find_tensor(table + 9 * count, count, pid, STEPS)
    m = scratch + tl.load(table + 2 * count + t)
    m_sr = tl.load(table + 3 * count + t)
    m_sc = tl.load(table + 4 * count + t)
    r = tl.load(table + 5 * count + t)
    c = tl.load(table + 6 * count + t)
    d = tl.load(table + 7 * count + t)
    k = pid - tl.load(table + 9 * count + t)
    tiles_d = tl.cdiv(d, BD)
    rows = (k // tiles_d) * BM + tl.arange(0, BM)
    k_d = k % tiles_d
    if MIXED:
        if tl.load(table + 8 * count + t) == 0:
            _panel(m, m_sr, m_sc, tl.load(table + count + t).to(tl.pointer_type(Y)),
                   tl.load(table + t).to(tl.pointer_type(X)), rows, k_d, r, c, d, BM, BC, BD)
        else:
            _panel(m, m_sr, m_sc, tl.load(table + count + t).to(tl.pointer_type(X)),
                   tl.load(table + t).to(tl.pointer_type(Y)), rows, k_d, r, c, d, BM, BC, BD)
    else:
        _panel(m, m_sr, m_sc, tl.load(table + count + t).to(tl.pointer_type(Y)),
               tl.load(table + t).to(tl.pointer_type(X)), rows, k_d, r, c, d, BM, BC, BD)


# ----------------------------------------------------------------------------- host code

class _Table:
    """Sub-tables of all launches of one call, uploaded with a single host-to-device copy."""

    def __init__(self):
        self.values: list[int] = []

    def add(self, columns: list[tuple[int, ...]], programs: list[int]) -> tuple[int, int]:
        """One row per field of `columns` (one tuple per job), then the first program of each job.
        Returns (offset of the sub-table, total programs)."""
        self.values.extend([0] * (-len(self.values) % _ALIGN))
        offset = len(self.values)
        for field in zip(*columns):
            self.values.extend(field)
        total = 0
        for p in programs:
            self.values.append(total)
            total += p
        return offset, total

    def upload(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.int64).to(device, non_blocking=True)


def _steps(count: int) -> int:
    return max(1, math.ceil(math.log2(count + 1)))


def _groups(keys) -> dict:
    """key -> indices with that key, in first-seen order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _tri_tiles(n: int) -> int:
    tiles = triton.cdiv(n, BT)
    return tiles * (tiles + 1) // 2


def _panel_programs(r: int, d: int) -> int:
    return triton.cdiv(r, BM) * triton.cdiv(d, BD)


def _scaled(d: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The forward's derivative buffer times grad_output (a device tensor: no host sync)."""
    return d * grad_output.detach().to(device=d.device, dtype=torch.float32)


def _gram_offsets(weights):
    offsets, total = [], 0
    for w in weights:
        offsets.append(total)
        total += w.shape[0] * w.shape[0]
    return offsets, total


def gram_orthogonality(weights: list[torch.Tensor], mean: bool):
    """(sum_l mean (or sum) of (W_l W_l^T - I)^2 as a 0-d fp32, d_gram [sum N_l^2] fp32); contiguous
    fp16/bf16/fp32 [N_l >= 1, D_l]."""
    _check(*weights)
    device = weights[0].device
    offsets, size = _gram_offsets(weights)
    table = _Table()
    plans = []
    for dtype, idx in _groups(w.dtype for w in weights).items():
        columns = [(weights[i].data_ptr(), weights[i].shape[0], weights[i].shape[1], offsets[i]) for i in idx]
        offset, programs = table.add(columns, [_tri_tiles(weights[i].shape[0]) for i in idx])
        plans.append((dtype, idx, offset, programs))
    table_d = table.upload(device)
    partials = torch.empty(sum(p[3] for p in plans), dtype=torch.float32, device=device)
    d_gram = torch.empty(size, dtype=torch.float32, device=device)
    first = 0
    for dtype, idx, offset, programs in plans:
        _gram_tiles_kernel[(programs,)](table_d[offset:], len(idx), partials[first:], d_gram, MEAN=mean,
                                        W=TL_DTYPE[dtype], BT=BT, BK=BK, STEPS=_steps(len(idx)))
        first += programs
    return partials.sum(), d_gram  # fixed-order reduction of the per-tile sums


def gram_orthogonality_backward(grad_output: torch.Tensor, d_gram: torch.Tensor, weights: list[torch.Tensor]):
    """dW_l = g E_l W_l, in each weight's dtype (E_l from the forward's d_gram)."""
    _check(*weights)
    device = weights[0].device
    grads = [torch.empty_like(w) for w in weights]
    offsets, _ = _gram_offsets(weights)
    table = _Table()
    plans = []
    for dtype, idx in _groups(w.dtype for w in weights).items():
        # dW = E W: E [n, n] row-major at the layer's offset
        jobs = [(grads[i].data_ptr(), weights[i].data_ptr(), offsets[i], weights[i].shape[0], 1,
                 weights[i].shape[0], weights[i].shape[0], weights[i].shape[1], 0) for i in idx]
        plans.append((dtype, idx, *table.add(jobs, [_panel_programs(*weights[i].shape) for i in idx])))
    table_d = table.upload(device)
    scratch = _scaled(d_gram, grad_output)
    for dtype, idx, jobs_at, panel_programs in plans:
        if panel_programs:  # zero when every D_l is 0
            _grad_panels_kernel[(panel_programs,)](table_d[jobs_at:], len(idx), scratch, X=TL_DTYPE[dtype],
                                                   Y=TL_DTYPE[dtype], MIXED=False, BM=BM, BC=BC, BD=BD,
                                                   STEPS=_steps(len(idx)))
    return grads


def _cross_offsets(old, new):
    offsets, total = [], 0
    for a, b in zip(old, new):
        offsets.append(total)
        total += a.shape[0] * b.shape[0]
    return offsets, total


def cross_orthogonality(old: list[torch.Tensor], new: list[torch.Tensor], l1: bool):
    """(sum_l |A_l B_l^T|.sum() (l1) or ((A_l B_l^T)^2).sum() as a 0-d fp32, d_products [sum r_l s_l]
    fp32); contiguous non-empty inputs."""
    _check(*old, *new)
    device = old[0].device
    offsets, size = _cross_offsets(old, new)
    table = _Table()
    plans = []
    for (a_dt, b_dt), idx in _groups(zip((a.dtype for a in old), (b.dtype for b in new))).items():
        columns = [(old[i].data_ptr(), new[i].data_ptr(), old[i].shape[0], new[i].shape[0], old[i].shape[1],
                    offsets[i]) for i in idx]
        programs = [triton.cdiv(old[i].shape[0], BT) * triton.cdiv(new[i].shape[0], BT) for i in idx]
        plans.append((a_dt, b_dt, len(idx), *table.add(columns, programs)))
    table_d = table.upload(device)
    partials = torch.empty(sum(p[4] for p in plans), dtype=torch.float32, device=device)
    d_products = torch.empty(size, dtype=torch.float32, device=device)
    first = 0
    for a_dt, b_dt, count, offset, programs in plans:
        _cross_tiles_kernel[(programs,)](table_d[offset:], count, partials[first:], d_products, L1=l1,
                                         A=TL_DTYPE[a_dt], B=TL_DTYPE[b_dt], BT=BT, BK=BK, STEPS=_steps(count))
        first += programs
    return partials.sum(), d_products  # fixed-order reduction of the per-tile sums


def cross_orthogonality_backward(grad_output: torch.Tensor, d_products: torch.Tensor, old: list[torch.Tensor],
                                 new: list[torch.Tensor], old_grad: bool, new_grad: bool):
    """(dA_l = g M_l B_l for every l or [] when not old_grad, dB_l = g M_l^T A_l or [] when not new_grad),
    M_l from the forward's d_products."""
    _check(*old, *new)
    if not (old_grad or new_grad):
        return [], []
    device = old[0].device
    d_old = [torch.empty_like(a) for a in old] if old_grad else []
    d_new = [torch.empty_like(b) for b in new] if new_grad else []
    offsets, _ = _cross_offsets(old, new)
    table = _Table()
    plans = []
    for (a_dt, b_dt), idx in _groups(zip((a.dtype for a in old), (b.dtype for b in new))).items():
        jobs, job_programs = [], []
        for i in idx:
            (r, d), s = old[i].shape, new[i].shape[0]
            if old_grad:  # dA = M B: M [r, s] row-major, contracted over s
                jobs.append((d_old[i].data_ptr(), new[i].data_ptr(), offsets[i], s, 1, r, s, d, 0))
                job_programs.append(_panel_programs(r, d))
            if new_grad:  # dB = M^T A: M read through swapped strides, contracted over r
                jobs.append((d_new[i].data_ptr(), old[i].data_ptr(), offsets[i], 1, s, s, r, d, 1))
                job_programs.append(_panel_programs(s, d))
        plans.append((a_dt, b_dt, len(jobs), *table.add(jobs, job_programs)))
    table_d = table.upload(device)
    scratch = _scaled(d_products, grad_output)
    for a_dt, b_dt, job_count, jobs_at, panel_programs in plans:
        # old (X) and new (Y) of different dtypes: each job picks its pointer types by its side
        _grad_panels_kernel[(panel_programs,)](table_d[jobs_at:], job_count, scratch, X=TL_DTYPE[a_dt],
                                               Y=TL_DTYPE[b_dt], MIXED=a_dt != b_dt, BM=BM, BC=BC, BD=BD,
                                               STEPS=_steps(job_count))
    return d_old, d_new
