"""L2 / EWC benchmark: rows of the table (`rows(device, quick)`), in the shape of the EMA rows.

Cases: the ViT-B/16 QKV set (12 x ([2304, 768] weight + [2304] bias), 21.3M elements: the
parameters "A Closer Look at Rehearsal-Free CL" regularizes) and the full ViT-B/16 list (152
tensors, 86.6M), with fp32 params or bf16 params + fp32 anchors / importance.

Ops and baselines (what users run today):
- `l2_penalty fwd+bwd`: EWC value and gradient added into `.grad`.
  baselines: Avalanche-style autograd loop `lam * sum((F * (p - a) ** 2).sum())` + backward;
  `torch._foreach_*` closed form; mammoth-style flat vectors (cat of params every step).
  ours: `l2_penalty(...).backward()` (the op's registered autograd formula) and `l2_penalty_grad_`
  (no graph).
- `fisher_accumulate_`: loop of `mul_` / `addcmul_`, `torch._foreach_*`, ours.
- `adamr step (lr pull)`: `torch.optim.Adam(fused=True)` + a separate foreach pull, ours with
  `pull_scale="lr"` (the same math).
- `adamr step (DAREx)`: DAREx's AdamR as its code runs it (a loop over parameters, the normalizer
  V read back to the host), ours with the default `pull_scale="stable"` (the same math).
Row keys match bench_ema: op, list, tensors, elements, dtype, impl, baseline, bytes, ms, ms_min,
reps (bench/run.py adds gbps, pct_copy and the speedup columns). The inputs of one (list, dtype,
op) are built once and shared by its rows, as in bench_ema; building 86.6M-element lists
dominated the CPU run time otherwise.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/bench_penalty.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ntkcl_fast  # noqa: E402
from bench import time_ms  # noqa: E402

LAM = 0.5


def vit_shapes(dim: int, depth: int, classes: int = 1000, patch: int = 16, img: int = 224) -> list[tuple]:
    tokens = (img // patch) ** 2 + 1
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    block = [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,),
             (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + block * depth + [(dim,), (dim,), (classes, dim), (classes,)]


def qkv_shapes(dim: int, depth: int) -> list[tuple]:
    return [(3 * dim, dim), (3 * dim,)] * depth


def _numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


LISTS = {
    "ViT-Ti/16 QKV": qkv_shapes(192, 12),
    "ViT-B/16 QKV": qkv_shapes(768, 12),
    "ViT-B/16": vit_shapes(768, 12),
}
assert _numel(LISTS["ViT-B/16 QKV"]) == 21_261_312 and _numel(LISTS["ViT-B/16"]) == 86_567_656
DTYPES = {"fp32": torch.float32, "bf16 (fp32 anchors)": torch.bfloat16}


def list_names(device: str, quick: bool) -> list[str]:
    if device == "cuda":
        return ["ViT-B/16 QKV"] if quick else ["ViT-B/16 QKV", "ViT-B/16"]
    return ["ViT-Ti/16 QKV"] if quick else ["ViT-B/16 QKV", "ViT-B/16"]


def make(shapes, p_dtype, device):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, p_dtype)) for s in shapes]
    anchors = [torch.randn(s, generator=gen).to(device) for s in shapes]
    fisher = [torch.rand(s, generator=gen).to(device) for s in shapes]
    for p in params:  # nonzero gradients: repeated decays of zeros would time denormal arithmetic
        p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(device, p_dtype)
    return params, anchors, fisher


def _bytes(tensors_per_elem: list[list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for lst in tensors_per_elem for t in lst)


# ---------------------------------------------------------------- penalty fwd + bwd
def _autograd_loop(P, A, F):
    def run():  # Avalanche EWCPlugin.before_backward
        penalty = torch.zeros((), device=P[0].device)
        for p, a, f in zip(P, A, F):
            penalty = penalty + (f * (p - a).pow(2)).sum()
        (LAM * penalty).backward()
    return run


def _foreach_closed_form(P, A, F):
    def run():
        with torch.no_grad():
            pf = [p.float() for p in P] if P[0].dtype != torch.float32 else list(P)
            d = torch._foreach_sub(pf, A)
            fd = torch._foreach_mul(d, F)
            value = LAM * torch.stack([x.sum() for x in torch._foreach_mul(fd, d)]).sum()
            g = torch._foreach_mul(fd, 2 * LAM)
            if P[0].dtype != torch.float32:
                g = [x.to(P[0].dtype) for x in g]
            torch._foreach_add_([p.grad for p in P], g)
        return value
    return run


def _mammoth_flat(P, A, F):
    fish = torch.cat([f.reshape(-1) for f in F])
    checkpoint = torch.cat([a.reshape(-1) for a in A])

    def run():  # mammoth EwcOn.penalty: get_params() concatenates every step
        flat = torch.cat([p.reshape(-1) for p in P])
        (LAM * (fish * ((flat - checkpoint) ** 2)).sum()).backward()
    return run


def _ours_autograd(backend):
    def build(P, A, F):
        return lambda: ntkcl_fast.l2_penalty(P, A, F, lam=LAM, backend=backend).backward()
    return build


def _ours_grad(backend):
    def build(P, A, F):
        return lambda: ntkcl_fast.l2_penalty_grad_(P, A, F, lam=LAM, backend=backend)
    return build


# ---------------------------------------------------------------- Fisher accumulation
def _fisher_loop(P, A, F):
    G = [p.grad for p in P]

    def run():
        for f, g in zip(F, G):
            f.mul_(0.9).addcmul_(g, g, value=0.1)
    return run


def _fisher_foreach(P, A, F):
    G = [p.grad for p in P]

    def run():
        torch._foreach_mul_(F, 0.9)
        torch._foreach_addcmul_(F, G, G, value=0.1)
    return run


def _fisher_ours(backend):
    def build(P, A, F):
        G = [p.grad for p in P]
        return lambda: ntkcl_fast.fisher_accumulate_(F, G, scale=0.1, decay=0.9, backend=backend)
    return build


# ---------------------------------------------------------------- AdamR
def _adam_plus_pull(P, A, F):
    opt = torch.optim.Adam(P, lr=1e-4, fused=True)  # fused Adam exists for CPU and CUDA tensors
    anchors = [a.to(P[0].dtype) for a in A]

    def run():
        with torch.no_grad():
            d = torch._foreach_sub(P, anchors)
            torch._foreach_add_(P, d, alpha=-1e-4 * 0.01)
        opt.step()
    return run


def _darex_loop(P, A, F):
    """DAREx's AdamR step (github.com/vengdeng/DAREx, AdamR.py), moments in fp32 as ours."""
    lr, pull, beta1, beta2, eps = 1e-4, 0.01, 0.9, 0.999, 1e-8
    state = [(torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)) for p in P]
    count = [0]

    def run():
        with torch.no_grad():
            count[0] += 1
            bc1, bc2 = 1 - beta1 ** count[0], 1 - beta2 ** count[0]
            total, size = 0.0, 0
            for p, (m, v) in zip(P, state):
                size += p.numel()
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                total += (v / bc2).sum()
            root = math.sqrt(total / size) or 1.0
            for p, a, (m, v) in zip(P, A, state):
                p.add_(-pull * lr / root * (p - a))
                p.addcdiv_(m, (v / bc2).sqrt().add(eps), value=-lr / bc1)
    return run


def _adamr_ours(backend, pull_scale):
    def build(P, A, F):
        opt = ntkcl_fast.AdamR(P, lr=1e-4, pull=0.01, pull_scale=pull_scale, anchors=A, backend=backend)
        return opt.step
    return build


def our_backends(device: str) -> list[str]:
    have = ntkcl_fast.backends()
    wanted = ["cuda", "triton"] if device == "cuda" else ["cpu"]
    return [b for b in wanted if have.get(b)]


def impls(device: str):
    """op -> [(label, baseline column or None, builder, min-bytes fn)]."""
    pen_bytes = lambda P, A, F: _bytes([P, A, F, P, P])  # noqa: E731  read p, a, F, grad; write grad
    fis_bytes = lambda P, A, F: _bytes([F, P, F])  # noqa: E731  read F, g; write F
    # read p, g, m, v, anchor; write p, m, v (moments fp32)
    adam_bytes = lambda P, A, F: _bytes([P, P, P]) + _bytes([F] * 4) + _bytes([A])  # noqa: E731
    ours = our_backends(device)
    return {
        "l2_penalty fwd+bwd": (pen_bytes, [("autograd loop (Avalanche)", "loop", _autograd_loop),
                                           ("foreach closed form", "foreach", _foreach_closed_form),
                                           ("flat vectors (mammoth)", "flat", _mammoth_flat)]
                               + [(f"l2_penalty+backward[{b}]", None, _ours_autograd(b)) for b in ours]
                               + [(f"l2_penalty_grad_[{b}]", None, _ours_grad(b)) for b in ours]),
        "fisher_accumulate_": (fis_bytes, [("loop mul_/addcmul_", "loop", _fisher_loop),
                                           ("foreach", "foreach", _fisher_foreach)]
                               + [(f"fisher_accumulate_[{b}]", None, _fisher_ours(b)) for b in ours]),
        "adamr step (lr pull)": (adam_bytes, [("Adam(fused) + foreach pull", "Adam+pull", _adam_plus_pull)]
                                 + [(f"AdamR[{b}] lr", None, _adamr_ours(b, "lr")) for b in ours]),
        "adamr step (DAREx)": (adam_bytes, [("DAREx AdamR loop", "DAREx", _darex_loop)]
                               + [(f"AdamR[{b}] stable", None, _adamr_ours(b, "stable")) for b in ours]),
    }


def rows(device: str, quick: bool) -> list[dict]:
    out = []
    for name in list_names(device, quick):
        shapes = LISTS[name]
        for dtype_name, p_dtype in DTYPES.items():
            for op, (nbytes_fn, entries) in impls(device).items():
                P, A, F = make(shapes, p_dtype, device)
                for label, baseline, build in entries:
                    fn = build(P, A, F)
                    t = time_ms(fn, device)
                    out.append({"op": op, "list": name, "tensors": len(shapes), "elements": _numel(shapes),
                                "dtype": dtype_name, "impl": label, "baseline": baseline,
                                "bytes": nbytes_fn(P, A, F), **t})
                    print(f"  {op} {name} {dtype_name} {label}: {t['ms']:.2f} ms (min {t['ms_min']:.2f})",
                          flush=True)
                    del fn  # frees a baseline's flat copies or optimizer state before the next row
                    if device == "cuda":
                        torch.cuda.empty_cache()
                del P, A, F
    return out


def host_overhead(device: str = "cpu", repeats: int = 2000) -> dict[str, float]:
    """Median microseconds per call on the ViT-B/16 list with one element per tensor (152
    tensors, bf16 params with fp32 anchors and importance): what Python and the dispatcher
    cost per call, with next to no kernel time. One thread: on a shared CPU the wake-up of idle
    pool threads would otherwise dominate. Run with `python bench/bench_penalty.py --host`."""
    import statistics
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    shapes = [(1,)] * len(LISTS["ViT-B/16"])
    P, A, F = make(shapes, torch.bfloat16, device)
    backend = our_backends(device)[0]
    opt = ntkcl_fast.AdamR(P, lr=1e-4, pull=0.01, anchors=A, backend=backend)
    calls = {
        "l2_penalty_grad_": lambda: ntkcl_fast.l2_penalty_grad_(P, A, F, lam=LAM, backend=backend),
        "l2_penalty+backward": lambda: ntkcl_fast.l2_penalty(P, A, F, lam=LAM, backend=backend).backward(),
        "fisher_accumulate_": lambda: ntkcl_fast.fisher_accumulate_(F, [p.grad for p in P], scale=1e-6,
                                                                    backend=backend),
        "AdamR.step": opt.step,
    }
    out = {}
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        out[name] = statistics.median(times)
    torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    if "--host" in sys.argv:
        for name, us in host_overhead().items():
            print(f"{name}: {us:.1f} us per call (152 one-element tensors)")
        sys.exit(0)
    from bench.run import standalone

    standalone("penalty")
