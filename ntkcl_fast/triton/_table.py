"""Launch tables for multi-tensor Triton kernels: one program per chunk of any tensor in a list."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}


def chunk_table(lists: list[list[torch.Tensor]], chunk: int, device: torch.device):
    """(int64 table on device, number of programs, binary-search steps).

    Table rows: one row of data pointers per list, then numel, then the first program id of each
    tensor (its chunk prefix sum). A kernel finds its tensor with `find_tensor`.
    """
    first = lists[0]
    firsts, total = [], 0
    for t in first:
        firsts.append(total)
        total += triton.cdiv(t.numel(), chunk)
    rows = [[t.data_ptr() for t in lst] for lst in lists] + [[t.numel() for t in first], firsts]
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    return table, total, max(1, math.ceil(math.log2(len(first) + 1)))


@triton.jit
def find_tensor(first_chunk_ptr, count, pid, STEPS: tl.constexpr):
    """Largest t in [0, count) with first_chunk[t] <= pid (binary search, STEPS >= log2(count + 1))."""
    lo = 0
    hi = count - 1
    for _ in tl.static_range(STEPS):
        mid = (lo + hi + 1) // 2
        go_right = tl.load(first_chunk_ptr + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo
