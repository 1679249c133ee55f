"""Triton kernels of `projection_residual` (forward and backward) and their host launchers.

With f_n the rows of `features [B, D]` (normalized when `normalize`), `U = basis [D, R]`
(not assumed orthonormal), c = f_n @ U [B, R] and r = f_n - c @ U^T [B, D], the value is
r.sum() or (r * r).sum(). R is padded to RP = max(16, next power of two) (a constexpr) so that
every `tl.dot` has block dims >= 16; the padded columns of U load as 0 and add nothing.

Forward, one launch, cdiv(B, BM) programs; each owns BM rows of f and walks D twice:
1. c += f_tile @ U_tile (`tl.dot`, fp32 accumulation) and the squared row norms from the same
   loaded tiles; c is scaled by the inverse row norms at the end (f_n @ U = (f @ U) / ||f||);
2. r_tile = f_n_tile - c @ U_tile^T, summed (or squared and summed) into an elementwise [BM, BK]
   accumulator that is reduced once at the end.
r is formed explicitly tile by tile rather than as |f_n|^2 - |c|^2, which cancels when the
residual is small (features nearly inside span(U)). Nothing of size B x D or D x D exists; the
[BM, RP] block c lives in registers. Each program writes one partial sum and the host adds the
partials with one `sum` over a fixed-size vector (deterministic, no atomics).

Backward, two launches, nothing kept from the forward but the inputs. With dr = dL/dr
(grad_output everywhere for "sum", 2 grad_output r for "sumsq") and e = dr @ U [B, R]:
  d f_n = dr - e @ U^T,  dU = -(f_n^T e + dr^T c),
  d f = inv_norm * (d f_n - f_n <f_n, d f_n>)  when normalizing,
with <f_n, d f_n> = <f_n, dr> - <c, e>, where <f_n, dr> is summed from explicit tiles.
1. rows kernel, cdiv(B, BM) programs, each owning BM rows: pass 1 recomputes c and the norms;
   pass 2 recomputes the r tiles (sumsq only; dr is a constant for "sum"), accumulates
   e += dr_tile @ U_tile and <f_n, dr>; pass 3 recomputes dr once more and writes
   d f_tile = inv * (dr - e @ U_tile^T - f_n * rowdot). It stores c, e [B, R] and the inverse
   norms [B] (fp32 scratch, the only intermediates) for launch 2.
2. basis kernel, cdiv(D, BK) programs, each owning BK rows of dU: walks B in blocks of BB,
   recomputing the f_n tile and (sumsq) r = f_n - c @ U^T from c, and accumulates
   f_n^T e + dr^T c in a [BK, RP] register block. One program per slice of dU sums over all of B
   in a fixed order: deterministic, no atomics, no [nblocks, D, R] partials.
A row whose norm is clamped (||f|| <= 1e-12, torch.nn.functional.normalize) gets the plain
d f_n / 1e-12 gradient, as autograd gives for x / eps: its <f_n, d f_n> term is dropped.

Cost, with s the element size. Forward: must read f and U once, s (B D + D R) bytes, and do two
products, 4 B D R flops; each program reads its rows of f twice (the second time from L1/L2) and
U twice. Backward: must read f and U and write d f and dU, 2 s (B D + D R) bytes, plus 2 x 4 B R
bytes of fp32 scratch written once and read once per basis program (from L2). It does 10 B D R
flops for "sum" (c, e, e U^T, f_n^T e, dr^T c; e and dr^T c are rank-one there, kept as plain
products for one code path) and 16 B D R for "sumsq" (the 12 B D R minimum when nothing is kept
from the forward, plus r recomputed in pass 3 and in the basis kernel instead of stored). The
tl.dot work runs at the padded rank RP. NTK-CL's shape B = 256, D = 768, R = 40 (RP = 64):
forward 31.5 MFLOP and 0.91 MB (fp32; 0.45 MB bf16), backward 78.6 / 125.8 MFLOP and 1.82 MB
(fp32); 16 forward programs, 16 rows programs and 12 basis programs. That is far below what an
H200 moves in a microsecond, so the op is latency-bound; splitting D across programs would
add parallelism only at the price of recomputing c or a cross-program reduction for it.

Ranks: RP <= 256 uses BB = 32 and the default pipelining; RP = 512 drops to BB = 16, one stage
and 8 warps so the fp32 [BB, RP] operand blocks fit in shared memory (<= 100 KB; the RP = 256
basis kernel is the largest at 156 KB, under an A100's 163 KB); R > 512 is refused (ValueError)
rather than failing at launch (RP = 1024 would need ~200 KB: H100/H200 only).

Loop trip counts are compile-time constants, as in ortho.py: DT = cdiv(D, BK) tiles of D and,
in the basis kernel, BT = cdiv(B, BB) blocks of rows. Triton 3.6's interpreter (the CPU test
path) fails on a loop whose bound is a runtime scalar under NumPy 2. The cost is one compile per
feature width (fixed through training) and per batch-size bucket of BB rows (a short last batch
of an epoch adds one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ortho import EPS, _check

BM = 16  # rows of f per program (tl.dot needs every block dim >= 16)
MAX_RANK = 512  # largest padded rank whose blocks fit in an A100's shared memory (see _Config)


class _Config:
    """Block sizes and launch options for a basis of rank R."""

    def __init__(self, r: int):
        if r > MAX_RANK:
            raise ValueError(f"the triton backend of projection_residual supports a basis of rank <= {MAX_RANK}, "
                             f"got {r}; use backend='cuda'/'cpu'/'torch'")
        # R padded to a power of two >= 16: the last dim of c, e and the U tiles (tl.dot)
        self.rp = max(16, triton.next_power_of_2(max(r, 1)))
        # D tile: wide while the U tile [BK, RP] stays at <= 4096 elements (16 KiB of fp32)
        self.bk = max(16, min(64, 4096 // self.rp))
        if self.rp <= 256:
            # rows of f per step of the basis kernel's walk over B; default pipelining
            self.bb, self.options = 32, {}
        else:
            # [BB, RP] blocks of c and e are operands of tl.dot (shared memory): at RP = 512 the
            # kernels need <= 100 KB with BB = 16 and no pipelining (RP = 1024 would need ~200 KB,
            # over an A100's 163 KB); 8 warps halve the registers each thread holds for the blocks
            self.bb, self.options = 16, {"num_stages": 1, "num_warps": 8}


@triton.jit
def _coefficients(f_ptr, u_ptr, rows, B, D, R, NORMALIZE: tl.constexpr, EPS: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, DT: tl.constexpr):
    """(c = f_n @ U [BM, RP], inverse row norms [BM], live [BM]) for this program's rows.

    inv is 1 when not normalizing; live is False for rows whose norm is clamped at EPS."""
    cols = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for kt in range(0, DT):
        k0 = kt * BK
        ks = k0 + tl.arange(0, BK)
        f = tl.load(f_ptr + rows[:, None].to(tl.int64) * D + ks[None, :],
                    mask=(rows[:, None] < B) & (ks[None, :] < D), other=0.0).to(tl.float32)
        u = tl.load(u_ptr + ks[:, None].to(tl.int64) * R + cols[None, :],
                    mask=(ks[:, None] < D) & (cols[None, :] < R), other=0.0).to(tl.float32)
        acc += tl.dot(f, u, input_precision="ieee")
        if NORMALIZE:
            ss += tl.sum(f * f, axis=1)
    if NORMALIZE:
        nrm = tl.sqrt(ss)
        live = nrm > EPS
        inv = 1.0 / tl.maximum(nrm, EPS)
    else:
        live = tl.full((BM,), 1, tl.int1)
        inv = tl.full((BM,), 1.0, tl.float32)
    return acc * inv[:, None], inv, live


@triton.jit
def _load_tile(f_ptr, u_ptr, inv, rows, k0, B, D, R, BK: tl.constexpr, RP: tl.constexpr):
    """(f_n, U^T tile [RP, BK], mask, column indices) of this program's rows at D offset k0;
    f_n is zero outside B x D."""
    ks = k0 + tl.arange(0, BK)
    cols = tl.arange(0, RP)
    mask = (rows[:, None] < B) & (ks[None, :] < D)
    fn = tl.load(f_ptr + rows[:, None].to(tl.int64) * D + ks[None, :], mask=mask,
                 other=0.0).to(tl.float32) * inv[:, None]
    # U^T addressed directly (no transpose of a loaded tile)
    ut = tl.load(u_ptr + ks[None, :].to(tl.int64) * R + cols[:, None],
                 mask=(cols[:, None] < R) & (ks[None, :] < D), other=0.0).to(tl.float32)
    return fn, ut, mask, ks


@triton.jit
def _residual_tile(f_ptr, u_ptr, c, inv, rows, k0, B, D, R, BM: tl.constexpr, BK: tl.constexpr,
                   RP: tl.constexpr):
    """(r, f_n, U^T tile [RP, BK], mask, column indices) of this program's rows at D offset k0;
    r and f_n are zero outside B x D."""
    fn, ut, mask, ks = _load_tile(f_ptr, u_ptr, inv, rows, k0, B, D, R, BK, RP)
    r = tl.where(mask, fn - tl.dot(c, ut, input_precision="ieee"), 0.0)
    return r, fn, ut, mask, ks


@triton.jit
def _pr_fwd_kernel(f_ptr, u_ptr, partials, B, D, R, NORMALIZE: tl.constexpr, SUMSQ: tl.constexpr,
                   EPS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, DT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    c, inv, live = _coefficients(f_ptr, u_ptr, rows, B, D, R, NORMALIZE, EPS, BM, BK, RP, DT)
    # elementwise accumulator: each entry adds D / BK terms, one tree reduction at the end
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for kt in range(0, DT):
        k0 = kt * BK
        r, fn, ut, mask, ks = _residual_tile(f_ptr, u_ptr, c, inv, rows, k0, B, D, R, BM, BK, RP)
        if SUMSQ:
            acc += r * r
        else:
            acc += r
    tl.store(partials + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _grad_residual_tile(f_ptr, u_ptr, c, inv, coef, rows, k0, B, D, R, SUMSQ: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
    """(dL/dr, f_n, U^T tile, mask, column indices) at D offset k0; dL/dr is zero outside B x D."""
    if SUMSQ:
        r, fn, ut, mask, ks = _residual_tile(f_ptr, u_ptr, c, inv, rows, k0, B, D, R, BM, BK, RP)
        dr = coef * r
    else:
        # "sum": dL/dr is grad_output everywhere, r itself is not needed
        fn, ut, mask, ks = _load_tile(f_ptr, u_ptr, inv, rows, k0, B, D, R, BK, RP)
        dr = tl.where(mask, coef, 0.0)
    return dr, fn, ut, mask, ks


@triton.jit
def _pr_bwd_rows_kernel(f_ptr, u_ptr, df_ptr, c_ptr, e_ptr, inv_ptr, coef_ptr, B, D, R,
                        NORMALIZE: tl.constexpr, SUMSQ: tl.constexpr, EPS: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, DT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, RP)
    coef = tl.load(coef_ptr)  # grad_output, times 2 for sumsq (read on device: no host sync)
    c, inv, live = _coefficients(f_ptr, u_ptr, rows, B, D, R, NORMALIZE, EPS, BM, BK, RP, DT)
    e = tl.zeros((BM, RP), dtype=tl.float32)
    fdr = tl.zeros((BM, BK), dtype=tl.float32)
    for kt in range(0, DT):
        k0 = kt * BK
        dr, fn, ut, mask, ks = _grad_residual_tile(f_ptr, u_ptr, c, inv, coef, rows, k0, B, D, R,
                                                   SUMSQ, BM, BK, RP)
        e += tl.dot(dr, tl.trans(ut), input_precision="ieee")
        if NORMALIZE:
            fdr += fn * dr
    # c, e and the norms go to the basis kernel, which needs them for every row
    rc = (rows[:, None] < B) & (cols[None, :] < R)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * R + cols[None, :], c, mask=rc)
    tl.store(e_ptr + rows[:, None].to(tl.int64) * R + cols[None, :], e, mask=rc)
    tl.store(inv_ptr + rows, inv, mask=rows < B)
    if NORMALIZE:
        # <f_n, d f_n> = <f_n, dr> - <f_n U, e>; zero for clamped rows (their gradient is d f_n / EPS)
        rowdot = tl.where(live, tl.sum(fdr, axis=1) - tl.sum(c * e, axis=1), 0.0)
    for kt in range(0, DT):
        k0 = kt * BK
        dr, fn, ut, mask, ks = _grad_residual_tile(f_ptr, u_ptr, c, inv, coef, rows, k0, B, D, R,
                                                   SUMSQ, BM, BK, RP)
        dfn = dr - tl.dot(e, ut, input_precision="ieee")
        if NORMALIZE:
            dfn = (dfn - fn * rowdot[:, None]) * inv[:, None]
        tl.store(df_ptr + rows[:, None].to(tl.int64) * D + ks[None, :], dfn.to(df_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _pr_bwd_basis_kernel(f_ptr, u_ptr, du_ptr, c_ptr, e_ptr, inv_ptr, coef_ptr, B, D, R,
                         NORMALIZE: tl.constexpr, SUMSQ: tl.constexpr, BB: tl.constexpr,
                         BK: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr):
    """dU[ds, :] = -(f_n[:, ds]^T e + dr[:, ds]^T c), summed over B in a fixed order."""
    pid = tl.program_id(0)
    ds = pid * BK + tl.arange(0, BK)
    cols = tl.arange(0, RP)
    coef = tl.load(coef_ptr)
    if SUMSQ:
        # this program's slice of U^T, loaded once for every r tile it recomputes
        ut = tl.load(u_ptr + ds[None, :].to(tl.int64) * R + cols[:, None],
                     mask=(cols[:, None] < R) & (ds[None, :] < D), other=0.0).to(tl.float32)
    acc = tl.zeros((BK, RP), dtype=tl.float32)
    for bt in range(0, BT):
        b0 = bt * BB
        rows = b0 + tl.arange(0, BB)
        mask = (rows[:, None] < B) & (ds[None, :] < D)
        rc = (rows[:, None] < B) & (cols[None, :] < R)
        fn = tl.load(f_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        if NORMALIZE:
            fn = fn * tl.load(inv_ptr + rows, mask=rows < B, other=0.0)[:, None]
        c = tl.load(c_ptr + rows[:, None].to(tl.int64) * R + cols[None, :], mask=rc, other=0.0)
        e = tl.load(e_ptr + rows[:, None].to(tl.int64) * R + cols[None, :], mask=rc, other=0.0)
        if SUMSQ:
            dr = tl.where(mask, coef * (fn - tl.dot(c, ut, input_precision="ieee")), 0.0)
        else:
            dr = tl.where(mask, coef, 0.0)
        acc += tl.dot(tl.trans(fn), e, input_precision="ieee")
        acc += tl.dot(tl.trans(dr), c, input_precision="ieee")
    tl.store(du_ptr + ds[:, None].to(tl.int64) * R + cols[None, :], (-acc).to(du_ptr.dtype.element_ty),
             mask=(ds[:, None] < D) & (cols[None, :] < R))


def projection_residual(features, basis, normalize: bool, sumsq: bool) -> torch.Tensor:
    _check(features, basis)
    B, D = features.shape
    R = basis.shape[1]
    cfg = _Config(R)
    grid = (triton.cdiv(B, BM),)
    partials = torch.empty(grid[0], dtype=torch.float32, device=features.device)
    _pr_fwd_kernel[grid](features, basis, partials, B, D, R, NORMALIZE=normalize, SUMSQ=sumsq, EPS=EPS,
                         BM=BM, BK=cfg.bk, RP=cfg.rp, DT=triton.cdiv(D, cfg.bk), **cfg.options)
    return partials.sum()


def projection_residual_backward(grad_output, features, basis, normalize: bool, sumsq: bool, features_grad: bool,
                                 basis_grad: bool):
    """(d features, d basis); d basis is skipped (empty) when not needed (a frozen basis), d features
    is always computed (the rows kernel produces it with c and e) and returned only when needed."""
    _check(features, basis)
    B, D = features.shape
    R = basis.shape[1]
    cfg = _Config(R)
    dev = features.device
    coef = (grad_output.to(torch.float32) * (2.0 if sumsq else 1.0)).reshape(1).contiguous()
    c = torch.empty(B, R, dtype=torch.float32, device=dev)
    e = torch.empty(B, R, dtype=torch.float32, device=dev)
    inv = torch.empty(B, dtype=torch.float32, device=dev)
    df = torch.empty_like(features)
    _pr_bwd_rows_kernel[(triton.cdiv(B, BM),)](
        features, basis, df, c, e, inv, coef, B, D, R, NORMALIZE=normalize, SUMSQ=sumsq, EPS=EPS,
        BM=BM, BK=cfg.bk, RP=cfg.rp, DT=triton.cdiv(D, cfg.bk), **cfg.options)
    du = torch.empty_like(basis) if basis_grad else basis.new_empty((0,))
    if basis_grad and R > 0:  # an empty basis has an empty gradient
        _pr_bwd_basis_kernel[(triton.cdiv(D, cfg.bk),)](
            features, basis, du, c, e, inv, coef, B, D, R, NORMALIZE=normalize, SUMSQ=sumsq,
            BB=cfg.bb, BK=cfg.bk, RP=cfg.rp, BT=triton.cdiv(B, cfg.bb), **cfg.options)
    return df if features_grad else features.new_empty((0,)), du
