"""DARE benchmark rows: `rows(device, quick)` -> list of dicts (op, case, backend, ms, gbps, pct_copy,
peak_extra_mb, speedup_vs_<baseline>...), and a table when run as a script.

Minimum bytes: out of place reads finetuned and base and writes out (3 x element size, 6 B/element
in bf16); in place (`dare_delta_`) reads and writes delta (2 x element size). Baselines are what
users write today: PEFT-style (bernoulli mask, mul, div), `rand_like` + `where`, `torch.compile`
of that expression, and PEFT's own `random_pruning` when peft is installed.

    python bench/bench_dare.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ntkcl_fast

P = 0.9


def _time_ms(fn, device: str, repeats: int) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_extra_mb(fn, device: str) -> float | None:
    """Memory allocated by one call beyond what existed before (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del res
    return peak / 2 ** 20


def _peft_style(f, b, p):
    mask = torch.bernoulli(torch.full_like(f, 1 - p))
    return b + (f - b) * mask / (1 - p)


def _rand_where(f, b, p):
    return torch.where(torch.rand_like(f) >= p, b + (f - b) / (1 - p), b)


def _baselines(device: str, inplace: bool):
    out = {"peft_style": (lambda f, b: _peft_style(f, b, P)) if not inplace else
           (lambda d, _b: d.mul_(torch.bernoulli(torch.full_like(d, 1 - P))).div_(1 - P)),
           "rand_where": (lambda f, b: _rand_where(f, b, P)) if not inplace else
           (lambda d, _b: d.copy_(torch.where(torch.rand_like(d) >= P, d / (1 - P), 0)))}
    try:
        compiled = torch.compile(_rand_where, dynamic=False)
        out["compile"] = lambda f, b: compiled(f, b, P)
    except Exception:  # noqa: BLE001 - no compiler on this machine: the column stays empty
        pass
    try:
        from peft.utils.merge_utils import random_pruning
        out["peft"] = (lambda f, b: b + random_pruning(f - b, 1 - P, True)) if not inplace else \
            (lambda d, _b: random_pruning(d, 1 - P, True))
    except ImportError:
        pass
    return out


def rows(device: str = "cpu", quick: bool = False) -> list[dict]:
    sizes = [1 << 20] if quick else ([1 << 24] if device == "cpu" else [1 << 24, 1 << 27, 1 << 30])
    repeats = 3 if quick else 10
    backends = [b for b in ("cpu", "cuda", "triton", "torch")
                if ntkcl_fast._backend.unavailable_reason(b, device, "dare_") is None]
    if device == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not a benchmark
    else:
        backends = [b for b in backends if b != "torch"]  # the NumPy oracle would draw 1G masks on the host
    result = []
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            f = torch.randn(n, device=device).to(dtype)
            b = torch.randn(n, device=device).to(dtype)
            esize = f.element_size()
            dst = torch.empty_like(f)
            copy_ms = _time_ms(lambda: dst.copy_(f), device, repeats)
            copy_gbps = 2 * n * esize / copy_ms / 1e6
            for inplace in (False, True):
                nbytes = (2 if inplace else 3) * n * esize
                case = f"n={n} {str(dtype).replace('torch.', '')} {'inplace' if inplace else 'out-of-place'}"
                base_ms = {}
                for name, fn in _baselines(device, inplace).items():
                    work = f.clone()
                    try:
                        base_ms[name] = _time_ms(lambda: fn(work, b), device, repeats)
                    except Exception:  # noqa: BLE001 - e.g. torch.compile without a C compiler
                        continue
                    result.append({"op": "dare", "case": case, "backend": f"baseline:{name}", "ms": base_ms[name],
                                   "gbps": nbytes / base_ms[name] / 1e6,
                                   "pct_copy": 100 * nbytes / base_ms[name] / 1e6 / copy_gbps,
                                   "peak_extra_mb": _peak_extra_mb(lambda: fn(work, b), device)})
                for backend in backends:
                    if inplace:
                        work = f.clone()
                        fn = lambda: ntkcl_fast.dare_delta_(work, P, seed=1, backend=backend)  # noqa: E731
                    else:
                        out = torch.empty_like(f)
                        fn = lambda: ntkcl_fast.dare(f, b, P, seed=1, out=out, backend=backend)  # noqa: E731
                    ms = _time_ms(fn, device, repeats)
                    row = {"op": "dare_delta_" if inplace else "dare", "case": case, "backend": backend, "ms": ms,
                           "gbps": nbytes / ms / 1e6, "pct_copy": 100 * nbytes / ms / 1e6 / copy_gbps,
                           "peak_extra_mb": _peak_extra_mb(fn, device)}
                    for name, bms in base_ms.items():
                        row[f"speedup_vs_{name}"] = bms / ms
                    result.append(row)
    return result


def _table(rs: list[dict]) -> str:
    keys = ["op", "case", "backend", "ms", "gbps", "pct_copy", "peak_extra_mb"]
    extra = sorted({k for r in rs for k in r if k.startswith("speedup")})
    lines = ["| " + " | ".join(keys + extra) + " |", "|" + "---|" * len(keys + extra)]
    for r in rs:
        cells = []
        for k in keys + extra:
            v = r.get(k)
            cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(_table(rows(args.device, args.quick)))
