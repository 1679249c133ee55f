"""Triton kernels of `merge_tensors` (API.md, "Model merging"), bit-identical to the CPU kernel
(csrc/cpu/merge.cpp).

The output comes from one fused pass: per block, base and each model are read once, each delta
sparsified, rescaled, weighted and mixed with the TIES election in registers (the weighted terms
are kept in a tuple, N is a compile-time constant), and the result rounded once on store.
Statistics come first, from read passes that write nothing of numel size:
- ties' thresholds by a radix select over the bits of |d_i| (16-bit digits: two histogram passes
  for fp32, four for fp64, with int64 atomics: counts are exact, so the order of the atomics
  cannot change them), plus one pass counting each block's ties at the threshold when they must
  be split by index. The digit search runs as torch ops on the device; one host sync decides
  whether the tie-count pass is needed.
- rescale="l1"'s norms summed in the CPU kernel's exact order (16 fp64 lanes per 256-element
  tile, lanes in order, tiles in order, 16384-element chunks in order), so the scale has its
  bits. The per-chunk sums come from a kernel; their sequential fold is numpy's add.accumulate
  on the host (a tree reduction on the device would round differently).
Rounding as on the CPU: floating point fusion is off at every launch (`enable_fp_fusion=False`;
the CPU build uses -ffp-contract=off, and one FMA in `b + lam * mixed` would change the last
bit), fp32 divisions are `div_rn` (Triton's `/` is the approximate div.full on NVIDIA GPUs), and
bf16 is rounded to nearest even by integer ops (the interpreter truncates on `.to(tl.bfloat16)`).
scripts/compile_triton_merge.py checks the PTX for all three.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..random import M32, M64
from ._table import TL_DTYPE
from .dare import philox4x32_10

BLOCK = 1024  # elements per program of the fused pass and the histogram / tie passes
# the CPU kernel's l1 summation order (csrc/cpu/multi_tensor.h kChunk, tile.h kTile, merge.cpp kLanes)
L1_CHUNK, L1_TILE, L1_LANES = 16384, 256, 16
DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
NO_KEY = (1 << 63) - 1  # above every magnitude key (fp64 NaN: 0x7FF0000000000001): no key reaches it
FAST_MATH_OFF = {"enable_fp_fusion": False}
SPARSIFY = {"ties": 1, "dare_linear": 2, "dare_ties": 2}  # 0: none, 1: magnitude, 2: random
RESCALE = {"none": 0, "density": 1, "l1": 2}


@triton.jit
def _magnitude_key(d, IS_F64: tl.constexpr):
    """|d| as an int64 ordered like the magnitude, every NaN one key above +inf (as the CPU kernel)."""
    if IS_F64:
        bits = d.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
        key = tl.where(bits > 0x7FF0000000000000, 0x7FF0000000000001, bits)
    else:
        bits = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        key = tl.where(bits > 0x7F800000, 0x7F800001, bits)
    return key


@triton.jit
def _load_model(ptrs, i, offs, mask, E: tl.constexpr, ACC: tl.constexpr):
    p = tl.load(ptrs + i).to(tl.pointer_type(E))
    return tl.load(p + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _draw_each(g, key_lo, key_hi, seed_lo, seed_hi):
    """The DARE word of each global flat index in g (any shape): one Philox call per element, its
    own word picked; for indices that do not start at a group of 4."""
    j = g >> 2
    zero = tl.zeros_like(g).to(tl.uint32)
    u0, u1, u2, u3 = philox4x32_10(j.to(tl.uint32), (j >> 32).to(tl.uint32), zero + key_lo, zero + key_hi,
                                   zero + seed_lo, zero + seed_hi)
    lane = g & 3
    return tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))


@triton.jit
def _draws(start, key_lo, key_hi, seed_lo, seed_hi, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """The DARE words of global flat elements [start, start + BLOCK); ALIGNED (start a multiple of
    4) shares one Philox call among 4 elements (triton/dare.py)."""
    if ALIGNED:
        G: tl.constexpr = BLOCK // 4
        j = (start >> 2) + tl.arange(0, G).to(tl.int64)
        zero = tl.zeros([G], dtype=tl.uint32)
        u0, u1, u2, u3 = philox4x32_10(j.to(tl.uint32), (j >> 32).to(tl.uint32), zero + key_lo, zero + key_hi,
                                       zero + seed_lo, zero + seed_hi)
        return tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])
    else:
        return _draw_each(start + tl.arange(0, BLOCK).to(tl.int64), key_lo, key_hi, seed_lo, seed_hi)


@triton.jit
def _div(a, b, IS_F64: tl.constexpr):
    """a / b correctly rounded: Triton's fp32 `/` is div.full (2 ulp) on NVIDIA GPUs."""
    if IS_F64:
        return a / b
    else:
        return tl.math.div_rn(a, b + tl.zeros_like(a))


@triton.jit
def _store(out, offs, mask, res, E: tl.constexpr):
    if E == tl.bfloat16:  # round to nearest even by hand: the interpreter truncates
        bits = res.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        half = tl.where(nan, (bits >> 16) | 0x40, rounded).to(tl.uint16)
        tl.store(out + offs, half.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out + offs, res.to(E), mask=mask)


@triton.jit
def _merge_kernel(out, base, ptrs, fparams, iparams, ties_before, n, n_blocks, offset, N: tl.constexpr,
                  E: tl.constexpr, ACC: tl.constexpr, IS_F64: tl.constexpr, LINEAR: tl.constexpr,
                  SPARSIFY: tl.constexpr, RESCALE: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                  SPLIT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """fparams (ACC): weights[N], density divisors[N], l1 scales[N], lam, guarded sum of weights.
    iparams (int64): key low words[N], key high words[N], thresholds[N] (draw or magnitude key),
    tie rooms[N], seed low, seed high. ties_before[i, block]: model i's ties in earlier blocks.
    Element j draws by its global index offset + j (ALIGNED: offset % 4 == 0)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    if not LINEAR:
        b = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
    seed_lo = tl.load(iparams + 4 * N).to(tl.uint32)
    seed_hi = tl.load(iparams + 4 * N + 1).to(tl.uint32)
    total = tl.zeros([BLOCK], dtype=ACC)  # sum of the terms (consensus), or the mix itself
    terms = ()
    for i in tl.static_range(N):
        m = _load_model(ptrs, i, offs, mask, E, ACC)
        w = tl.load(fparams + i)
        if LINEAR:
            t = m
        else:
            d = m - b
            t = d
            if SPARSIFY == 1:
                key = _magnitude_key(d, IS_F64)
                th = tl.load(iparams + 2 * N + i)
                if SPLIT:  # ties at the threshold kept in index order while the room lasts
                    eq = (key == th) & mask
                    rank = tl.load(ties_before + i * n_blocks + pid) + tl.cumsum(eq.to(tl.int64), 0) - eq.to(tl.int64)
                    keep = (key > th) | (eq & (rank < tl.load(iparams + 3 * N + i)))
                else:
                    keep = key >= th
                t = tl.where(keep, d, 0.0)
            if SPARSIFY == 2:
                u = _draws(offset + pid * BLOCK, tl.load(iparams + i).to(tl.uint32),
                           tl.load(iparams + N + i).to(tl.uint32), seed_lo, seed_hi, BLOCK, ALIGNED)
                t = tl.where(u.to(tl.int64) >= tl.load(iparams + 2 * N + i), d, 0.0)
                if RESCALE == 1:
                    t = _div(t, tl.load(fparams + N + i), IS_F64)
                if RESCALE == 2:
                    t = t * tl.load(fparams + 2 * N + i)
        e = t * w
        total = total + e
        if CONSENSUS:
            terms = terms + (e,)
    if CONSENSUS:
        mixed = tl.zeros([BLOCK], dtype=ACC)
        div = tl.zeros([BLOCK], dtype=ACC)
        for i in tl.static_range(N):
            e = terms[i]
            take = tl.where(total >= 0, e > 0, e < 0)  # zeros and NaN never take part
            mixed = mixed + tl.where(take, e, 0.0)
            div = div + tl.where(take, tl.load(fparams + i), 0.0)
        if NORMALIZE:
            mixed = _div(mixed, tl.where(div == 0, 1.0, div).to(ACC), IS_F64)
    else:
        mixed = total
        if NORMALIZE:
            mixed = _div(mixed, tl.load(fparams + 3 * N + 1), IS_F64)
    if LINEAR:
        res = mixed
    else:
        res = b + tl.load(fparams + 3 * N) * mixed
    _store(out, offs, mask, res, E)


@triton.jit
def _histogram_kernel(base, ptrs, prefix, hist, n, S: tl.constexpr, SHIFT: tl.constexpr, FIRST: tl.constexpr,
                      E: tl.constexpr, ACC: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    """hist[s, digit] += keys of model s whose higher digits equal prefix[s] (all keys when FIRST)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    b = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
    ones = tl.full([BLOCK], 1, dtype=tl.int64)
    for s in tl.static_range(S):
        key = _magnitude_key(_load_model(ptrs, s, offs, mask, E, ACC) - b, IS_F64)
        counted = mask
        if not FIRST:
            counted = counted & ((key >> (SHIFT + 16)) == tl.load(prefix + s))
        tl.atomic_add(hist + s * 65536 + ((key >> SHIFT) & 0xFFFF), ones, mask=counted, sem="relaxed")


@triton.jit
def _tie_count_kernel(base, ptrs, thresholds, counts, n, n_blocks, S: tl.constexpr, E: tl.constexpr,
                      ACC: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    """counts[s, block] = entries of model s in this block whose key is its threshold."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    b = tl.load(base + offs, mask=mask, other=0.0).to(ACC)
    for s in tl.static_range(S):
        key = _magnitude_key(_load_model(ptrs, s, offs, mask, E, ACC) - b, IS_F64)
        eq = (key == tl.load(thresholds + s)) & mask
        tl.store(counts + s * n_blocks + pid, tl.sum(eq.to(tl.int64), 0))


@triton.jit
def _fold_columns(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """((+0 + x[:, 0]) + x[:, 1]) + ...: a sum in column order (each masked row sum has one
    nonzero term, so it is exact). x >= +0 or NaN, so no zero sign is lost."""
    cols = tl.arange(0, COLS)[None, :]
    acc = tl.zeros([ROWS], dtype=tl.float64)
    for c in range(COLS):  # a loop, not unrolled: one body to compile
        acc = acc + tl.sum(tl.where(cols == c, x, 0.0), 1)
    return acc


@triton.jit
def _l1_kernel(base, ptrs, iparams, full, kept, n, n_chunks, S, offset, E: tl.constexpr, ACC: tl.constexpr,
               CHUNK: tl.constexpr, TILE: tl.constexpr, LANES: tl.constexpr, TILES: tl.constexpr,
               ALIGNED: tl.constexpr):
    """full[s, chunk], kept[s, chunk]: this chunk's ||d_s||_1 and ||kept d_s||_1 in fp64, summed
    as the CPU kernel does: lane l of a tile adds elements l, l + LANES, ... in order, the lanes
    are added in order, the tiles in order. The first TILES tiles of the chunk (all, unless the
    tensor is shorter than a chunk: missing tiles would add +0, which changes no sum).
    iparams and offset as in _merge_kernel with N = S."""
    G: tl.constexpr = LANES // 4  # Philox calls per row of a tile
    c = tl.program_id(0).to(tl.int64)
    tiles = tl.arange(0, TILES)[:, None].to(tl.int64)
    lanes = tl.arange(0, LANES)[None, :]
    groups = tl.arange(0, G)[None, :].to(tl.int64)
    zero = tl.zeros([TILES, G], dtype=tl.uint32)
    seed_lo = zero + tl.load(iparams + 4 * S).to(tl.uint32)
    seed_hi = zero + tl.load(iparams + 4 * S + 1).to(tl.uint32)
    for s in range(S):
        key_lo = zero + tl.load(iparams + s).to(tl.uint32)
        key_hi = zero + tl.load(iparams + S + s).to(tl.uint32)
        th = tl.load(iparams + 2 * S + s)
        lane_full = tl.zeros([TILES, LANES], dtype=tl.float64)
        lane_kept = tl.zeros([TILES, LANES], dtype=tl.float64)
        for r in range(TILE // LANES):  # row r of every tile: elements r * LANES + lane, in row order
            row = c * CHUNK + tiles * TILE + r * LANES  # [TILES, 1], a multiple of 4
            offs = row + lanes
            mask = offs < n
            d = _load_model(ptrs, s, offs, mask, E, ACC) - tl.load(base + offs, mask=mask, other=0.0).to(ACC)
            if ALIGNED:
                j = ((offset + row) >> 2) + groups
                u0, u1, u2, u3 = philox4x32_10(j.to(tl.uint32), (j >> 32).to(tl.uint32), key_lo, key_hi, seed_lo,
                                               seed_hi)
                u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [TILES, LANES])
            else:
                u = _draw_each(offset + offs, tl.load(iparams + s).to(tl.uint32),
                               tl.load(iparams + S + s).to(tl.uint32), tl.load(iparams + 4 * S).to(tl.uint32),
                               tl.load(iparams + 4 * S + 1).to(tl.uint32))
            a = tl.abs(d.to(tl.float64))
            lane_full = lane_full + a
            lane_kept = lane_kept + tl.where(u.to(tl.int64) >= th, a, 0.0)
        tile_full = _fold_columns(lane_full, TILES, LANES)
        tile_kept = _fold_columns(lane_kept, TILES, LANES)
        tl.store(full + s * n_chunks + c, tl.sum(_fold_columns(tile_full[None, :], 1, TILES), 0))
        tl.store(kept + s * n_chunks + c, tl.sum(_fold_columns(tile_kept[None, :], 1, TILES), 0))


# ---------------------------------------------------------------- host launchers
def _pointers(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def _int_params(keys: list[int], thresholds: list[int], rooms: list[int], seed: int, device) -> torch.Tensor:
    rows = [k & M32 for k in keys] + [k >> 32 for k in keys] + thresholds + rooms + [seed & M32, seed >> 32]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _select(base, models, ks: list[int], meta: dict):
    """Per model, its k-th largest magnitude key, how many ties at that key it keeps and how many
    it has: a radix select from the top digit down, the digit search as torch ops on the device."""
    device, n, s = base.device, base.numel(), len(models)
    ptrs = _pointers(models, device)
    key_bits = 64 if meta["IS_F64"] else 32
    need = torch.tensor(ks, dtype=torch.int64).to(device)
    prefix = torch.zeros(s, dtype=torch.int64, device=device)
    for level in range(key_bits // DIGIT_BITS):
        shift = key_bits - DIGIT_BITS * (level + 1)
        hist = torch.zeros(s, BINS, dtype=torch.int64, device=device)
        _histogram_kernel[(triton.cdiv(n, BLOCK),)](base, ptrs, prefix, hist, n, S=s, SHIFT=shift, FIRST=level == 0,
                                                    BLOCK=BLOCK, **meta, **FAST_MATH_OFF)
        at_or_above = hist.flip(1).cumsum(1).flip(1)  # [model, digit]: keys with this digit or a higher one
        # the highest digit at or above which `need` keys lie (non-increasing in the digit: a prefix of True)
        digit = ((at_or_above >= need[:, None]).sum(1) - 1).clamp_min(0)[:, None]
        ties = hist.gather(1, digit).squeeze(1)
        need = need - (at_or_above.gather(1, digit).squeeze(1) - ties)
        prefix = (prefix << DIGIT_BITS) | digit.squeeze(1)
    return prefix, need, ties


def _magnitude_plan(base, models, densities: list[float], meta: dict):
    """(thresholds, rooms) as int64 device tensors [N] and ties_before [N, blocks] or None.
    Model i keeps key > threshold, and its ties at the threshold while their index rank < room."""
    n, device, nm = base.numel(), base.device, len(models)
    thresholds, selected, ks = [0] * nm, [], []  # threshold 0: keep all
    for i, r in enumerate(densities):
        k = int(r * n) if r < 1.0 else n  # floor, as the reference's int(r * numel)
        if k <= 0:
            thresholds[i] = NO_KEY
        elif k < n:
            selected.append(i)
            ks.append(k)
    th = torch.tensor(thresholds, dtype=torch.int64).to(device)
    rooms = torch.full((nm,), NO_KEY, dtype=torch.int64, device=device)
    if not selected:
        return th, rooms, None
    prefix, need, ties = _select(base, [models[i] for i in selected], ks, meta)
    index = torch.tensor(selected, dtype=torch.int64).to(device)
    th[index] = prefix
    split = (need != ties).tolist()  # the one host sync: is a pass over the ties needed at all?
    if not any(split):
        return th, rooms, None
    part = [s for s, x in enumerate(split) if x]
    rooms[index[part]] = need[part]
    n_blocks = triton.cdiv(n, BLOCK)
    counts = torch.empty(len(part), n_blocks, dtype=torch.int64, device=device)
    _tie_count_kernel[(n_blocks,)](base, _pointers([models[selected[s]] for s in part], device), prefix[part], counts,
                                   n, n_blocks, S=len(part), BLOCK=BLOCK, **meta, **FAST_MATH_OFF)
    ties_before = torch.zeros(nm, n_blocks, dtype=torch.int64, device=device)
    ties_before[index[part]] = counts.cumsum(1) - counts
    return th, rooms, ties_before


def _l1_scales(base, models, keys: list[int], thresholds: list[int], seed: int, offset: int, meta: dict,
               acc) -> list[float]:
    """||d_i||_1 / ||kept d_i||_1 in the CPU kernel's order and rounding, 1 when either is below 1e-7
    (a NaN norm is not below it: NaN scale, as csrc/cpu/merge.cpp and reference.dare.l1_rescaled)."""
    n, device, s = base.numel(), base.device, len(models)
    n_chunks = triton.cdiv(n, L1_CHUNK)
    full = torch.empty(s, n_chunks, dtype=torch.float64, device=device)
    kept = torch.empty_like(full)
    _l1_kernel[(n_chunks,)](base, _pointers(models, device), _int_params(keys, thresholds, [0] * s, seed, device),
                            full, kept, n, n_chunks, s, offset, E=meta["E"], ACC=meta["ACC"], CHUNK=L1_CHUNK,
                            TILE=L1_TILE, LANES=L1_LANES,
                            TILES=triton.next_power_of_2(triton.cdiv(min(n, L1_CHUNK), L1_TILE)),
                            ALIGNED=offset % 4 == 0, **FAST_MATH_OFF)
    # chunks added in order from +0: add.accumulate is a strictly sequential fold
    f = np.add.accumulate(full.cpu().numpy(), axis=1)[:, -1]
    k = np.add.accumulate(kept.cpu().numpy(), axis=1)[:, -1]
    scales = []
    for fi, ki in zip(f, k):
        fa, ka = acc(fi), acc(ki)
        with np.errstate(invalid="ignore"):  # inf / inf is NaN, as in the CPU kernel
            scales.append(1.0 if fa < acc(1e-7) or ka < acc(1e-7) else float(fa / ka))
    return scales


def merge_tensors(base: torch.Tensor | None, models: list[torch.Tensor], method: str, weights: list[float],
                  densities: list[float], lam: float, normalize: bool, rescale: str, seed: int,
                  key: int, offset: int = 0) -> torch.Tensor:
    """Contiguous, validated tensors of one device (see ntkcl_fast.merge); `seed`, `key` as the
    schema's int64 bits; element j draws by global index offset + j. A new tensor of the base's
    (models[0]'s for linear) shape and dtype."""
    like = base if base is not None else models[0]
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    n, device, nm = out.numel(), like.device, len(models)
    if n == 0:
        return out
    is_f64 = like.dtype == torch.float64
    acc = np.float64 if is_f64 else np.float32
    meta = dict(E=TL_DTYPE[like.dtype], ACC=tl.float64 if is_f64 else tl.float32, IS_F64=is_f64)
    linear = method == "linear"
    sparsify = 0 if linear else SPARSIFY.get(method, 0)
    seed, key = seed & M64, key & M64
    keys = [(key + i) & M64 for i in range(nm)]
    divisors, scales = [1.0] * nm, [1.0] * nm  # x / 1 and x * 1 are exact: no flags needed
    th, rooms, ties_before = [0] * nm, [NO_KEY] * nm, None
    if sparsify == 2:
        th = [min(int((1.0 - r) * 4294967296.0), 1 << 32) for r in densities]  # the DARE keep rule, u >= th
        if rescale == "density":
            divisors = [r if r > 0 else 1.0 for r in densities]
        elif rescale == "l1":
            scales = _l1_scales(base, models, keys, th, seed, offset, meta, acc)
    iparams = _int_params(keys, th, rooms, seed, device)
    if sparsify == 1:
        th_dev, rooms_dev, ties_before = _magnitude_plan(base, models, densities, meta)
        iparams[2 * nm:3 * nm] = th_dev
        iparams[3 * nm:4 * nm] = rooms_dev
    w = [acc(x) for x in weights]
    total = acc(0)
    for x in w:  # the guarded sum of weights, a left fold in the math type
        total = total + x
    if abs(total) < acc(1e-8):
        total = acc(1)
    fparams = torch.from_numpy(np.array(w + [acc(x) for x in divisors + scales] + [acc(lam), total],
                                        dtype=acc)).to(device)
    n_blocks = triton.cdiv(n, BLOCK)
    _merge_kernel[(n_blocks,)](out, base if base is not None else out, _pointers(models, device), fparams, iparams,
                               ties_before if ties_before is not None else iparams, n, n_blocks, offset, N=nm,
                               LINEAR=linear, SPARSIFY=sparsify, RESCALE=RESCALE[rescale] if sparsify == 2 else 0,
                               CONSENSUS=method in ("ties", "dare_ties"), NORMALIZE=normalize,
                               SPLIT=ties_before is not None, ALIGNED=offset % 4 == 0, BLOCK=BLOCK, **meta,
                               **FAST_MATH_OFF)
    return out
