"""One set of sample inputs per op of the L2 / EWC / AdamR family (pytorch/extension-cpp style).

Each function returns argument tuples in the op's schema order, built from a seeded generator:
random values (never zeros), odd sizes, mixed dtypes, with and without importance. The same
samples feed the correctness, gradient, opcheck, compile and version-counter tests.
"""
from __future__ import annotations

import torch

SHAPES = [(1,), (3,), (1023,), (17, 33), (2, 3, 5)]
P_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
HYPER = [1e-2, 0.8, 0.95, 1e-6, 0.05, 0.3]  # lr, beta1, beta2, eps, weight_decay, pull


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def l2_samples(device, *, requires_grad: bool = False, seed: int = 0):
    """(params, anchors, importance, scale): params of mixed dtypes with fp32 anchors and
    importance; the same lists with importance [] (plain L2); one fp64 list; one single tensor."""
    gen = _gen(seed)
    params = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, P_DTYPES)]
    anchors = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    importance = [(torch.rand(s, generator=gen) + 0.05).to(device) for s in SHAPES]
    p64 = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in SHAPES[:3]]
    a64 = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in SHAPES[:3]]
    f64 = [torch.rand(s, generator=gen, dtype=torch.float64).to(device) for s in SHAPES[:3]]
    samples = [(params, anchors, importance, 0.35), (params, anchors, [], 1.0), (p64, a64, f64, -0.25),
               ([params[2]], [anchors[2]], [importance[2]], 2.5)]
    if requires_grad:
        samples = [([p.detach().clone().requires_grad_() for p in ps], a, f, s) for ps, a, f, s in samples]
    return samples


def l2_grad_samples(device, *, seed: int = 0):
    """(grads, params, anchors, importance, scale, grad_output, accumulate): grads random (to be
    accumulated into) or NaN-poisoned (to be overwritten), grad_output None or a 0-d tensor."""
    out = []
    for k, (params, anchors, importance, scale) in enumerate(l2_samples(device, seed=seed)):
        accumulate = k % 2 == 0
        gen = _gen(seed + 100 + k)
        grads = [torch.randn(p.shape, generator=gen).to(device, p.dtype) if accumulate
                 else torch.full_like(p, float("nan")) for p in params]
        go = None if k % 3 == 0 else torch.tensor(0.5 + k, device=device)
        out.append((grads, params, anchors, importance, scale, go, accumulate))
    return out


def fisher_samples(device, *, seed: int = 0):
    """(fisher, grads, scale, decay): fp32 / bf16 / fp64 Fisher with gradients of other dtypes."""
    gen = _gen(seed)
    f_dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.float16]
    fisher = [torch.rand(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, f_dtypes)]
    grads = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, P_DTYPES)]
    return [(fisher, grads, 0.125, 0.9), (fisher[:2], grads[:2], 1.0, 1.0)]


def adamr_hyper(step: int, lr=HYPER[0], beta1=HYPER[1], beta2=HYPER[2], eps=HYPER[3], wd=HYPER[4], pull=HYPER[5]):
    return [lr, beta1, beta2, eps, wd, pull, lr / (1 - beta1 ** step), 1 / (1 - beta2 ** step) ** 0.5]


def adamr_samples(device, *, seed: int = 0):
    """(params, grads, exp_avg, exp_avg_sq, anchors, hyper, l1) at step 3, L2 and L1 pull."""
    gen = _gen(seed)
    params = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, P_DTYPES)]
    grads = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, P_DTYPES)]
    moment = [torch.float64 if dt == torch.float64 else torch.float32 for dt in P_DTYPES]
    m = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, moment)]
    v = [torch.rand(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, moment)]
    anchors = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    return [(params, grads, m, v, anchors, adamr_hyper(3), False),
            (params[:2], grads[:2], m[:2], v[:2], anchors[:2], adamr_hyper(1), True)]

