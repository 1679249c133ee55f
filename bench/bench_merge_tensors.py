"""merge_tensors benchmark on CPU: one flat tensor (16.8M elements), N = 2 and 4 models, fp32 and
bf16, methods linear, ties (density 0.5) and dare_ties (density 0.5, l1 rescale).

Minimum traffic: read base and N models, write the result, (N + 2) x element size bytes per
element (linear reads no base: counted the same, for one column of GB/s). Rows: `ours`
(the fused kernel), `reference` (ntkcl_fast.reference.merge, whole-tensor torch ops) and
`mergekit` (their per-tensor code as eager torch, tests/_mergekit_peer.py, with our DARE mask).
Times are minima over the calls (the machine is shared).

    python bench/bench_merge_tensors.py [--numel N] [--reps R]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ntkcl_fast  # noqa: E402
from ntkcl_fast.merge import merge_tensors  # noqa: E402
from tests import _mergekit_peer as peer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _min_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _mergekit(method, base, models, w, r):
    if method == "linear":
        return lambda: peer.linear(models, w, True)
    keeps = None
    if method == "dare_ties":
        keeps = [ntkcl_fast.dare_mask(base.shape, 1 - x, seed=0, key=i) for i, x in enumerate(r)]
    return lambda: peer.generalized_task_arithmetic(
        base, models, w, r, consensus=True, sparsification="magnitude" if method == "ties" else "random",
        normalize=method == "ties", rescale_norm="l1" if method == "dare_ties" else None, lambda_=1.0, keeps=keeps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, {args.numel} elements")
    print(f"{'N':>2} {'dtype':>5} {'method':>10} {'impl':>10} {'ms':>9} {'GB/s':>7}")
    for n in (2, 4):
        for dname, dtype in DTYPES.items():
            base = torch.randn(args.numel).to(dtype)
            models = [(base.float() + 0.01 * torch.randn(args.numel)).to(dtype) for _ in range(n)]
            w, r = [1.0 / n] * n, [0.5] * n
            gb = (n + 2) * base.element_size() * args.numel / 1e9
            for method in ("linear", "ties", "dare_ties"):
                kw = dict(method=method, weight=w)
                if method != "linear":
                    kw["density"] = r
                if method == "dare_ties":
                    kw["rescale"] = "l1"
                b = None if method == "linear" else base
                impls = {"ours": lambda: merge_tensors(b, models, backend="cpu", **kw),
                         "reference": lambda: merge_tensors(b, models, backend="torch", **kw),
                         "mergekit": _mergekit(method, base, models, w, r)}
                for impl, fn in impls.items():
                    ms = _min_ms(fn, args.reps)
                    print(f"{n:>2} {dname:>5} {method:>10} {impl:>10} {ms:9.1f} {gb / ms * 1e3:7.2f}", flush=True)


if __name__ == "__main__":
    main()
