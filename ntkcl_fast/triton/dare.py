"""Triton DARE: Philox4x32-10 in uint32 arithmetic (its own implementation, not tl.randint, so
the stream does not depend on one Triton version), four elements per Philox call, integer
threshold compare, fp32 math (fp64 for fp64) rounded once on store."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..random import M32
from ._table import TL_DTYPE, chunk_table, find_tensor

BLOCK = 1024  # elements per program (BLOCK // 4 Philox calls)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """uint32 tensors in, the four uint32 output words out; high halves via 64-bit products."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p1 = c2.to(tl.uint64) * 0xCD9E8D57
        n0 = (p1 >> 32).to(tl.uint32) ^ c1 ^ k0
        n2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c0 = n0
        c1 = p1.to(tl.uint32)
        c2 = n2
        c3 = p0.to(tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def _dare_kernel(out, fin, base, q_rows, params, qbuf, n, inner, offset, HAS_BASE: tl.constexpr,
                 HAS_ROWS: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Element i draws u(offset + i); ALIGNED (offset % 4 == 0) shares one Philox call among 4 elements."""
    pid = tl.program_id(0).to(tl.int64)
    key_lo = tl.load(params + 0).to(tl.uint32)
    key_hi = tl.load(params + 1).to(tl.uint32)
    seed_lo = tl.load(params + 2).to(tl.uint32)
    seed_hi = tl.load(params + 3).to(tl.uint32)
    thresh = tl.load(params + 4)  # int64 in [0, 2**32]
    if ALIGNED:
        G: tl.constexpr = BLOCK // 4
        j = (offset >> 2) + pid * G + tl.arange(0, G).to(tl.int64)  # Philox counter of elements 4j .. 4j + 3
        zero = tl.zeros([G], dtype=tl.uint32)
        u0, u1, u2, u3 = philox4x32_10(j.to(tl.uint32), (j >> 32).to(tl.uint32), zero + key_lo, zero + key_hi,
                                       zero + seed_lo, zero + seed_hi)
        # interleave to element order 4j + l: join(join(u0, u2), join(u1, u3))[j, b, a] is u_(2b + a)
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])
    else:  # a shard that starts inside a group of 4: one call per element, its own word picked
        g = offset + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        j = g >> 2
        zero = tl.zeros([BLOCK], dtype=tl.uint32)
        u0, u1, u2, u3 = philox4x32_10(j.to(tl.uint32), (j >> 32).to(tl.uint32), zero + key_lo, zero + key_hi,
                                       zero + seed_lo, zero + seed_hi)
        lane = g & 3
        u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
    keep = u.to(tl.int64) >= thresh
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    f = tl.load(fin + offs, mask=mask).to(ACC)
    if HAS_ROWS:
        q = tl.load(q_rows + offs // inner, mask=mask, other=1.0).to(ACC)
    else:
        q = tl.load(qbuf).to(ACC)
    if HAS_BASE:
        b = tl.load(base + offs, mask=mask).to(ACC)
        res = tl.where(keep, b + (f - b) / q, b)
    else:
        res = tl.where(keep, f / q, 0.0)
    tl.store(out + offs, res.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dare_multi_kernel(table, count, keys, qs, seed_lo, seed_hi, thresh, E: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """One program per BLOCK of any tensor of the list; per-tensor key and q from device arrays."""
    pid = tl.program_id(0)
    t = find_tensor(table + 4 * count, count, pid, STEPS)
    out = tl.load(table + t).to(tl.pointer_type(E))
    fin = tl.load(table + count + t).to(tl.pointer_type(E))
    base = tl.load(table + 2 * count + t).to(tl.pointer_type(E))
    n = tl.load(table + 3 * count + t)
    block = (pid - tl.load(table + 4 * count + t)).to(tl.int64)
    G: tl.constexpr = BLOCK // 4
    j = block * G + tl.arange(0, G).to(tl.int64)
    zero = tl.zeros([G], dtype=tl.uint32)
    key_lo = tl.load(keys + 2 * t).to(tl.uint32)
    key_hi = tl.load(keys + 2 * t + 1).to(tl.uint32)
    u0, u1, u2, u3 = philox4x32_10(j.to(tl.uint32), (j >> 32).to(tl.uint32), zero + key_lo, zero + key_hi,
                                   zero + tl.load(seed_lo).to(tl.uint32), zero + tl.load(seed_hi).to(tl.uint32))
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])
    keep = u.to(tl.int64) >= tl.load(thresh)
    offs = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    f = tl.load(fin + offs, mask=mask).to(ACC)
    b = tl.load(base + offs, mask=mask).to(ACC)
    q = tl.load(qs + t).to(ACC)
    res = tl.where(keep, b + (f - b) / q, b)
    tl.store(out + offs, res.to(E), mask=mask)


def dare_multi_(out: list[torch.Tensor], fin: list[torch.Tensor], base: list[torch.Tensor], threshold: int,
                qs: list[float], seed: int, keys: list[int]) -> None:
    """Contiguous, validated tensors of one device: one launch per dtype for the whole list.
    `seed` and `keys` are uint64 (the op in ntkcl_fast.dare converts the schema's int64 bits)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, o in enumerate(out):
        if o.numel():
            groups.setdefault(o.dtype, []).append(i)
    for dtype, idx in groups.items():
        device = out[idx[0]].device
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        table, programs, steps = chunk_table([[out[i] for i in idx], [fin[i] for i in idx], [base[i] for i in idx]],
                                             BLOCK, device)
        key_words = torch.tensor([[keys[i] & M32, keys[i] >> 32] for i in idx], dtype=torch.int64).to(device)
        q_dev = torch.tensor([qs[i] for i in idx], dtype=acc).to(device)
        scalars = torch.tensor([seed & M32, seed >> 32, threshold], dtype=torch.int64).to(device)
        _dare_multi_kernel[(programs,)](table, len(idx), key_words, q_dev, scalars[0:], scalars[1:], scalars[2:],
                                        E=TL_DTYPE[dtype], ACC=tl.float64 if acc == torch.float64 else tl.float32,
                                        BLOCK=BLOCK, STEPS=steps)


def dare_(out: torch.Tensor, fin: torch.Tensor, base: torch.Tensor | None, threshold: int, q: float,
          q_rows: torch.Tensor | None, seed: int, key: int, offset: int = 0) -> None:
    """Contiguous, validated inputs (see ntkcl_fast.dare); `out` may be `fin` or `base`; `seed`, `key` uint64;
    element i draws the keep rule's u(offset + i)."""
    n = out.numel()
    if n == 0:
        return
    device = out.device
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    params = torch.tensor([key & M32, key >> 32, seed & M32, seed >> 32, threshold], dtype=torch.int64).to(device)
    qbuf = torch.tensor([q], dtype=acc_dtype).to(device)
    inner = n // out.shape[0] if q_rows is not None else 1
    grid = (triton.cdiv(n, BLOCK),)
    _dare_kernel[grid](out, fin, base if base is not None else fin, q_rows if q_rows is not None else qbuf,
                       params, qbuf, n, inner, offset, HAS_BASE=base is not None, HAS_ROWS=q_rows is not None,
                       ALIGNED=offset % 4 == 0,
                       ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=BLOCK)
