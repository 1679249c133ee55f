"""What each orthogonality op's contract costs: keeping the forward's products for the backward
(what the ops do) against recomputing them in the backward from the inputs.

For the compiled backend of a device, per NTK-CL / CODA-P / O-LoRA case: the median time of
forward + backward with the kept outputs (`kept`), the same with the forward op run once more
inside the backward (`recompute`: what a backward from the inputs alone does at least), and the
bytes the kept outputs hold between forward and backward.

    python bench/bench_ortho_contracts.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/bench_ortho_contracts.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ntkcl_fast  # noqa: E402,F401  (registers the ops)
from bench import time_ms  # noqa: E402


def _cases(device):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    ops = torch.ops.ntkcl_fast
    go = torch.tensor(1.0, device=device)
    f, p = r(256, 768), r(200, 768)
    yield ("feature_orthogonality B256 K200 D768", lambda: ops.feature_orthogonality(f, p, True, True),
           lambda out: ops.feature_orthogonality_backward(go, *out[1:], f, p, True, True, True, True))
    labels = torch.randint(0, 20, (256,), generator=gen).to(device)
    yield ("ntkcl_contrastive N256 D768", lambda: ops.ntkcl_contrastive(f, labels, 0.1),
           lambda out: ops.ntkcl_contrastive_backward(go, *out[1:], f, labels, 0.1))
    coda = [r(100, 768) for _ in range(10)] + [r(100, 8 * 768) for _ in range(5)]
    yield ("gram_orthogonality CODA-P K/A/P", lambda: ops.gram_orthogonality(coda, True),
           lambda out: ops.gram_orthogonality_backward(go, out[1], coda))
    old, new = [r(32, 1024) for _ in range(48)], [r(8, 1024) for _ in range(48)]
    yield ("cross_orthogonality O-LoRA 24 layers D1024", lambda: ops.cross_orthogonality(old, new, True),
           lambda out: ops.cross_orthogonality_backward(go, out[1], old, new, False, True))


def rows(device: str) -> list[dict]:
    out = []
    for case, forward, backward in _cases(device):
        kept = forward()
        kept_bytes = sum(t.numel() * t.element_size() for t in kept[1:])
        t_kept = time_ms(lambda: backward(forward()), device)
        # a backward from the inputs rebuilds the products first: at least one more forward
        t_recompute = time_ms(lambda: (forward(), backward(forward())), device)
        out.append({"case": case, "kept_ms": t_kept["ms"], "kept_ms_min": t_kept["ms_min"],
                    "recompute_ms": t_recompute["ms"], "recompute_ms_min": t_recompute["ms_min"],
                    "kept_kb": kept_bytes / 1024})
        print(f"{case}: kept {t_kept['ms']:.3f} ms (min {t_kept['ms_min']:.3f}), recompute "
              f"{t_recompute['ms']:.3f} ms (min {t_recompute['ms_min']:.3f}), kept outputs "
              f"{kept_bytes / 1024:.0f} KiB", flush=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    rows(parser.parse_args().device)
