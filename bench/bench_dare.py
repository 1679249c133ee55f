"""DARE benchmark: rows of the table (`rows(device, quick)`), in the shape of the EMA rows.

p = 0.9 on one flat tensor (16.8M elements on CPU; 16.8M, 134M and 1.07G on GPU), fp32 and bf16.
Minimum bytes: out of place (`dare`) reads finetuned and base and writes out (3 x element size,
6 B/element in bf16); in place (`dare_delta_`) reads and writes delta (2 x element size).
Baselines are what users write today:
- `bernoulli`: PEFT-style `bernoulli(full_like(1 - p))`, mul, div;
- `eager`: `rand_like` + `where`;
- `compile`: `torch.compile` of that `rand_like` + `where` expression (out of place in both modes);
- `peft`: PEFT's own `random_pruning` (plus the base add out of place), when peft is installed.
Ours: `ntkcl_fast.dare(..., out=)` / `dare_delta_` on each compiled backend (the `torch`
backend is the NumPy Philox oracle, about 2.5 s per 16.8M-element call on CPU: a reference,
not a contender, so it has no row; Triton on CPU would only time its interpreter).
Row keys: op, list, tensors, elements, dtype, impl, baseline, bytes, ms, ms_min, reps, and
peak_mb (extra memory one call allocates; CUDA only, None on CPU).

    python bench/bench_dare.py [--device cpu|cuda] [--quick] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/bench_dare.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ntkcl_fast  # noqa: E402
from bench import time_ms  # noqa: E402

P = 0.9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def _baselines(inplace: bool) -> list[tuple[str, str, object]]:
    """(label, baseline column, fn(work, base)) for what users write today."""
    out = [("PEFT-style bernoulli mul/div", "bernoulli",
            (lambda f, b: _peft_style(f, b, P)) if not inplace else
            (lambda d, _b: d.mul_(torch.bernoulli(torch.full_like(d, 1 - P))).div_(1 - P))),
           ("rand_like + where", "eager",
            (lambda f, b: _rand_where(f, b, P)) if not inplace else
            (lambda d, _b: d.copy_(torch.where(torch.rand_like(d) >= P, d / (1 - P), 0))))]
    try:
        compiled = torch.compile(_rand_where, dynamic=False)
        out.append(("torch.compile(rand_like + where)", "compile", lambda f, b: compiled(f, b, P)))
    except Exception:  # noqa: BLE001 - no compiler on this machine: the column stays empty
        pass
    try:
        from peft.utils.merge_utils import random_pruning
        out.append(("peft random_pruning", "peft",
                    (lambda f, b: b + random_pruning(f - b, 1 - P, True)) if not inplace else
                    (lambda d, _b: random_pruning(d, 1 - P, True))))
    except ImportError:
        pass
    return out


def our_backends(device: str) -> list[str]:
    wanted = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    return [b for b in wanted if ntkcl_fast._backend.unavailable_reason(b, device, "dare_") is None]


def rows(device: str, quick: bool) -> list[dict]:
    sizes = [1 << 20] if quick else ([1 << 24] if device == "cpu" else [1 << 24, 1 << 27, 1 << 30])
    out = []
    for n in sizes:
        for dtype_name, dtype in DTYPES.items():
            f = torch.randn(n, device=device).to(dtype)
            b = torch.randn(n, device=device).to(dtype)
            for inplace in (False, True):
                op = "dare_delta_" if inplace else "dare"
                entries = [(label, col, lambda fn=fn, work=f.clone(): fn(work, b))
                           for label, col, fn in _baselines(inplace)]
                for backend in our_backends(device):
                    if inplace:
                        work = f.clone()
                        entries.append((f"ntkcl_fast[{backend}]", None,
                                        lambda work=work, backend=backend:
                                        ntkcl_fast.dare_delta_(work, P, seed=1, backend=backend)))
                    else:
                        dst = torch.empty_like(f)
                        entries.append((f"ntkcl_fast[{backend}]", None,
                                        lambda dst=dst, backend=backend:
                                        ntkcl_fast.dare(f, b, P, seed=1, out=dst, backend=backend)))
                for label, baseline, fn in entries:
                    try:
                        t = time_ms(fn, device)
                    except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a C compiler
                        print(f"  {op} {dtype_name} {label}: skipped ({type(e).__name__})", flush=True)
                        continue
                    out.append({"op": op, "list": f"flat {n / 1e6:.1f}M", "tensors": 1, "elements": n,
                                "dtype": dtype_name, "impl": label, "baseline": baseline,
                                "bytes": (2 if inplace else 3) * n * f.element_size(), **t,
                                "peak_mb": _peak_extra_mb(fn, device)})
                    print(f"  {op} {n} {dtype_name} {label}: {t['ms']:.2f} ms (min {t['ms_min']:.2f})", flush=True)
                del entries
            del f, b
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    from bench.run import standalone

    standalone("dare")
