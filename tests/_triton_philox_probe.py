"""A Triton kernel that runs ntkcl_fast's Triton Philox4x32-10 on given counters and keys (tests only)."""
import triton
import triton.language as tl

from ntkcl_fast.triton.dare import philox4x32_10


@triton.jit
def draw(cnt, keys, out, N: tl.constexpr):
    r = tl.arange(0, N)
    c0 = tl.load(cnt + r * 4 + 0).to(tl.uint32)
    c1 = tl.load(cnt + r * 4 + 1).to(tl.uint32)
    c2 = tl.load(cnt + r * 4 + 2).to(tl.uint32)
    c3 = tl.load(cnt + r * 4 + 3).to(tl.uint32)
    k0 = tl.load(keys + r * 2 + 0).to(tl.uint32)
    k1 = tl.load(keys + r * 2 + 1).to(tl.uint32)
    o0, o1, o2, o3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out + r * 4 + 0, o0.to(tl.int64))
    tl.store(out + r * 4 + 1, o1.to(tl.int64))
    tl.store(out + r * 4 + 2, o2.to(tl.int64))
    tl.store(out + r * 4 + 3, o3.to(tl.int64))
