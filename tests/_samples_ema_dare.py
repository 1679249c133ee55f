"""Sample inputs of the EMA and DARE ops (pytorch/extension-cpp style): one set per op, shared by
the correctness, opcheck and torch.compile tests. Odd sizes, mixed dtypes, random values."""
from __future__ import annotations

import torch

from ntkcl_fast.random import as_i64, tensor_key, threshold

BIG_SEED = (1 << 64) - 3


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def ema_samples(device, *, grad: bool = False):
    """(name, ema list, src list, decay) for `ema_update_`: float, per-pair and 0-d tensor decays,
    mixed dtypes, an int buffer, a non-contiguous pair. `grad`: src tensors require grad."""
    gen = torch.Generator().manual_seed(0)

    def lists():
        ema = [_randn((3,), torch.float32, device, gen), _randn((1023,), torch.bfloat16, device, gen),
               _randn((7, 13), torch.float64, device, gen), torch.zeros(5, dtype=torch.int64, device=device)]
        src = [_randn((3,), torch.float16, device, gen), _randn((1023,), torch.float32, device, gen),
               _randn((7, 13), torch.float64, device, gen), torch.arange(5, device=device)]
        if grad:
            for s in src[:3]:
                s.requires_grad_()
        return ema, src

    out = []
    for name, decay in (("float", 0.875), ("per-pair", [0.9, 0.0, 1.0, 0.3]),
                        ("tensor", torch.tensor(0.75, device=device))):
        ema, src = lists()
        out.append((name, ema, src, decay))
    strided = _randn((13, 7), torch.float32, device, gen).t()
    out.append(("non-contiguous", [strided, _randn((9, 20), torch.float32, device, gen)[:, ::3]],
                [_randn((7, 13), torch.bfloat16, device, gen), _randn((20, 9), torch.float32, device, gen).t()[:, 1::3]],
                0.5))
    return out


def ema_op_samples(device, *, grad: bool = False):
    """Argument tuples of the `ema_update_` op itself (contiguous floating pairs, as the API passes them)."""
    gen = torch.Generator().manual_seed(1)
    ema = [_randn((5, 3), torch.float32, device, gen), _randn((17,), torch.bfloat16, device, gen)]
    src = [_randn((5, 3), torch.float16, device, gen), _randn((17,), torch.float32, device, gen)]
    for s in src:
        s.requires_grad_(grad)
    return [(ema, src, [0.9, 0.5], None), ([e.clone() for e in ema], src, [], torch.tensor(0.9, device=device))]


def dare_samples(device):
    """(name, finetuned, base, kwargs) for `dare`: DARE, scalar DAREx q, per-row q, p = 0 and 1,
    fp16 / bf16 / fp64, a transposed pair."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for name, shape, dtype, p, q in (("dare", (1023,), torch.float32, 0.5, None),
                                     ("scalar-q", (7, 13), torch.bfloat16, 0.7, 0.45),
                                     ("row-q", (7, 3, 5), torch.float64, 0.6, "rows"),
                                     ("keep-all", (3,), torch.float16, 0.0, None),
                                     ("keep-none", (1,), torch.float32, 1.0, None)):
        f, b = _randn(shape, dtype, device, gen), _randn(shape, dtype, device, gen)
        if q == "rows":
            q = torch.rand(shape[0], generator=gen).add_(0.2).to(device)
        out.append((name, f, b, dict(p=p, q=q, seed=BIG_SEED, key=tensor_key(name))))
    f, b = _randn((13, 7), torch.float32, device, gen), _randn((13, 7), torch.float32, device, gen)
    out.append(("transposed", f.t(), b.t(), dict(p=0.3, q=None, seed=5, key=6)))
    return out


def dare_op_samples(device, *, grad: bool = False):
    """Argument tuples of the `dare_` op: with base, delta mode with per-row q, in place on finetuned."""
    gen = torch.Generator().manual_seed(3)
    f, b = _randn((4, 9), torch.float32, device, gen), _randn((4, 9), torch.float32, device, gen)
    f.requires_grad_(grad)
    b.requires_grad_(grad)
    rows = torch.rand(4, generator=gen).add_(0.5).to(device)
    own = _randn((4, 9), torch.float32, device, gen)
    return [(torch.empty_like(f.detach()), f, b, threshold(0.5), 2.0, None, as_i64(BIG_SEED), -5),
            (torch.empty_like(f.detach()), f, None, threshold(0.3), 1.0, rows, 1, 5),
            (own, own, b, threshold(0.9), 0.1, None, 3, 4)]


def dare_multi_op_samples(device, *, grad: bool = False):
    gen = torch.Generator().manual_seed(4)
    fins = [_randn((4, 9), torch.float32, device, gen), _randn((3,), torch.bfloat16, device, gen)]
    bases = [_randn((4, 9), torch.float32, device, gen), _randn((3,), torch.bfloat16, device, gen)]
    for t in fins + bases:
        t.requires_grad_(grad)
    outs = [torch.empty_like(f.detach()) for f in fins]
    return [(outs, fins, bases, threshold(0.4), [2.0, 3.0], 1, [5, -6])]


def prune_samples(device):
    """(name, delta, density) for `magnitude_prune_`: odd sizes, ties, NaN."""
    gen = torch.Generator().manual_seed(5)
    nan = _randn((33,), torch.float32, device, gen)
    nan[[2, 17]] = float("nan")
    ties = torch.randint(-3, 4, (1023,), generator=gen).to(device, torch.bfloat16)
    return [("randn", _randn((7, 13), torch.float64, device, gen), 0.37), ("ties", ties, 0.5),
            ("nan", nan, 0.25), ("one", _randn((1,), torch.float16, device, gen), 1.0)]
