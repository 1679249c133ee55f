"""Triton EMA: one launch per (ema dtype, src dtype) combination for the whole list."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._table import TL_DTYPE, chunk_table, find_tensor

CHUNK = 4096


@triton.jit
def _ema_kernel(table, count, decays, decay_ptr, HAS_DECAY_PTR: tl.constexpr, E: tl.constexpr,
                S: tl.constexpr, ACC: tl.constexpr, VIA_FP32: tl.constexpr, CHUNK: tl.constexpr,
                STEPS: tl.constexpr):
    pid = tl.program_id(0)
    t = find_tensor(table + 3 * count, count, pid, STEPS)
    ema = tl.load(table + t).to(tl.pointer_type(E))
    src = tl.load(table + count + t).to(tl.pointer_type(S))
    n = tl.load(table + 2 * count + t)
    # the weight 1 - decay in fp64, then rounded to the math type, as torch rounds a Python float
    if HAS_DECAY_PTR:
        w = (1 - tl.load(decay_ptr)).to(ACC)
    else:
        w = (1 - tl.load(decays + t)).to(ACC)
    offs = (pid - tl.load(table + 3 * count + t)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    e = tl.load(ema + offs, mask=mask).to(ACC)
    s = tl.load(src + offs, mask=mask).to(ACC)
    # torch.lerp(e, s, w) as ATen computes it: w < 0.5 ? fma(w, s - e, e) : fma(w - 1, s - e, s),
    # so decay 0 copies s exactly (w - 1 is exact for w in [0.5, 1])
    from_ema = w < 0.5
    out = tl.fma(tl.where(from_ema, w, w - 1), s - e, tl.where(from_ema, e, s))
    if VIA_FP32:
        out = out.to(tl.float32)
    tl.store(ema + offs, out.to(E), mask=mask)


def ema_update_(ema: list[torch.Tensor], src: list[torch.Tensor], decays: list[float],
                decay_t: torch.Tensor | None) -> None:
    """Contiguous, validated inputs (see ntkcl_fast.ema); `decays` ignored when `decay_t` is given."""
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (e, s) in enumerate(zip(ema, src)):
        if e.numel():
            groups.setdefault((e.dtype, s.dtype), []).append(i)
    if not groups:
        return
    device = ema[0].device
    decay_arg = decay_t.to(torch.float64) if decay_t is not None else None
    for (e_dtype, s_dtype), idx in groups.items():
        table, programs, steps = chunk_table([[ema[i] for i in idx], [src[i] for i in idx]], CHUNK, device)
        per_tensor = torch.tensor([decays[i] for i in idx] if decay_t is None else [0.0],
                                  dtype=torch.float64).to(device, non_blocking=True)
        acc = tl.float64 if torch.float64 in (e_dtype, s_dtype) else tl.float32
        # fp64 results stored to 16 bits round through fp32, as torch's own fp64 -> fp16/bf16
        # conversion does (and Triton's interpreter has no direct fp64 -> bf16 cast)
        via_fp32 = e_dtype in (torch.float16, torch.bfloat16) and acc == tl.float64
        _ema_kernel[(programs,)](table, len(idx), per_tensor,
                                 decay_arg if decay_arg is not None else per_tensor,
                                 HAS_DECAY_PTR=decay_arg is not None, E=TL_DTYPE[e_dtype],
                                 S=TL_DTYPE[s_dtype], ACC=acc, VIA_FP32=via_fp32, CHUNK=CHUNK,
                                 STEPS=steps)
