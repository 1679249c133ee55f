"""Orthogonality and feature-loss benchmark: rows of the table (`rows(device, quick)`).

Cases (forward + backward, gradients to every input that trains):
- NTK-CL: `feature_orthogonality` of B=256 features against K=200 class prototypes (D 768 and
  2304; trained and frozen prototypes), `projection_residual` against a rank-40 prototype basis, `ntkcl_contrastive` on N=256.
- CODA-Prompt: `gram_orthogonality` over the prompt lists (5 layers x [100 components, 768]
  keys, attention vectors and prompts [100, 8 * 768]).
- O-LoRA: `cross_orthogonality` over 12 or 24 layers x (q, v) of rank 8 LoRA A matrices,
  D 768 to 4096, against the concatenated old tasks' A matrices (rank 8 x 4 tasks).

Baselines: eager autograd as the anchor projects write it (`ntkcl_fast.reference.ortho_eager`,
column `eager`), and the same code
under `torch.compile` (column `compile`). Row keys are the EMA rows' (op, list = the case,
tensors and elements of the inputs, dtype, impl, baseline, ms, ms_min, reps) with `bytes` None:
these ops are matrix products, not bandwidth bound. Extra keys: flops (of the matrix products,
forward + backward) and peak_mb (CUDA: torch.cuda.max_memory_allocated over one call beyond
what was allocated before; CPU: not measured, None).

    python bench/bench_ortho.py [--device cpu|cuda] [--quick] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/bench_ortho.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ntkcl_fast  # noqa: E402
from bench import sync, time_ms  # noqa: E402
from ntkcl_fast.reference import ortho_eager as eager  # noqa: E402


# ---------------------------------------------------------------- cases
def _cases(device: str, quick: bool):
    gen = torch.Generator().manual_seed(0)

    def r(*shape, grad=True, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(grad)

    dims = [768] if quick else [768, 2304]
    for d in dims:
        f, p = r(256, d), r(200, d)
        yield ("feature_orthogonality", f"NTK-CL B256 K200 D{d}", (f, p), 3 * 2 * 256 * 200 * d,
               eager.feature_orthogonality, lambda f, p, b: ntkcl_fast.feature_orthogonality(f, p, backend=b))
        # stored class means of old tasks: only the features train (one backward GEMM fewer)
        yield ("feature_orthogonality", f"B256 K200 D{d} frozen prototypes", (r(256, d), r(200, d, grad=False)),
               2 * 2 * 256 * 200 * d,
               eager.feature_orthogonality, lambda f, p, b: ntkcl_fast.feature_orthogonality(f, p, backend=b))
        u = ntkcl_fast.prototype_basis(torch.randn(200, d, generator=gen), 40).to(device)
        yield ("projection_residual", f"NTK-CL B256 D{d} rank40", (r(256, d), u), 2 * 2 * 256 * d * 40,
               eager.projection_residual, lambda f, u, b: ntkcl_fast.projection_residual(f, u, backend=b))
        labels = torch.randint(0, 20, (256,), generator=gen).to(device)
        yield ("ntkcl_contrastive", f"NTK-CL N256 D{d}", (r(256, d), labels), 3 * 2 * 256 * 256 * d,
               eager.ntkcl_contrastive, lambda f, y, b: ntkcl_fast.ntkcl_contrastive(f, y, backend=b))
    coda = [r(100, 768) for _ in range(10)] + [r(100, 8 * 768) for _ in range(5)]  # keys, attention, prompts
    yield ("gram_orthogonality", "CODA-P 5 layers K/A/P", (coda,),
           sum(3 * 2 * w.shape[0] ** 2 * w.shape[1] for w in coda),
           eager.gram_orthogonality, lambda ws, b: ntkcl_fast.gram_orthogonality(ws, backend=b))
    for layers, d in ([(12, 768)] if quick else [(12, 768), (24, 1024), (24, 4096)]):
        old = [r(32, d, grad=False) for _ in range(2 * layers)]  # 4 old tasks x rank 8, q and v
        new = [r(8, d) for _ in range(2 * layers)]
        yield ("cross_orthogonality", f"O-LoRA {layers} layers q,v r8 D{d}", (old, new),
               2 * layers * 3 * 2 * 32 * 8 * d,
               eager.cross_orthogonality, lambda o, n, b: ntkcl_fast.cross_orthogonality(o, n, backend=b))


def _leaves(args):
    return [t for a in args for t in (a if isinstance(a, list) else [a])
            if isinstance(t, torch.Tensor) and t.requires_grad]


def _step(fn, args):
    leaves = _leaves(args)

    def run():
        for t in leaves:
            t.grad = None
        fn(*args).backward()
    return run


def _peak_mb(run, device):
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def rows(device: str, quick: bool) -> list[dict]:
    """Forward + backward of each case: eager, torch.compile(eager), and every available backend."""
    avail = ntkcl_fast.backends()
    ours = [b for b in ("cpu", "cuda", "triton") if avail[b] and (b != "cpu" or device == "cpu")
            and (b != "cuda" or device == "cuda") and (b != "triton" or device == "cuda")]
    out = []
    for op, case, args, flops, eager, fast in _cases(device, quick):
        impls = [("eager autograd", "eager", _step(eager, args))]
        try:
            run = _step(torch.compile(eager), args)
            run()
            impls.append(("torch.compile(eager)", "compile", run))
        except Exception:  # noqa: BLE001 - no compiler on this machine: the column stays empty
            pass
        for b in ours:
            try:
                run = _step(lambda *a, b=b: fast(*a, b), args)
                run()
                impls.append((f"ntkcl_fast[{b}]", None, run))
            except (RuntimeError, NotImplementedError):
                pass
        inputs = [t for a in args for t in (a if isinstance(a, list) else [a])]
        for label, baseline, run in impls:
            t = time_ms(run, device)
            out.append({
                "op": op, "list": case, "tensors": len(inputs), "elements": sum(x.numel() for x in inputs),
                "dtype": "fp32", "impl": label, "baseline": baseline, "bytes": None, **t,
                "flops": flops, "peak_mb": _peak_mb(run, device),
            })
            print(f"  {op} {case} {label}: {t['ms']:.3f} ms (min {t['ms_min']:.3f})", flush=True)
    return out


if __name__ == "__main__":
    from bench.run import standalone

    standalone("ortho")
