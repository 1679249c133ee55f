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


def adamr_hyper(lr=HYPER[0], beta1=HYPER[1], beta2=HYPER[2], eps=HYPER[3], wd=HYPER[4], pull=HYPER[5],
                l1=False) -> dict:
    """The keyword arguments of ntkcl_fast::adamr_step_."""
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, pull=pull, l1=l1)


def _adamr_tensors(device, seed):
    gen = _gen(seed)
    params = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, P_DTYPES)]
    grads = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, P_DTYPES)]
    moment = [torch.float64 if dt == torch.float64 else torch.float32 for dt in P_DTYPES]
    m = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, moment)]
    v = [torch.rand(s, generator=gen).to(device, dt) for s, dt in zip(SHAPES, moment)]
    vm = [(x + torch.rand(x.shape, generator=gen).to(x.dtype).to(device) - 0.5).clamp_min(0) for x in v]
    anchors = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    steps = [torch.tensor(float(k + 2), device=device) for k in range(len(SHAPES))]  # unequal step counts
    return params, grads, m, v, vm, anchors, steps


def adamr_samples(device, *, seed: int = 0):
    """(args, kwargs) of adamr_step_: AMSGrad with DAREx's V on device; plain Adam with the L1 pull
    scaled by lr (no V) at the first step."""
    params, grads, m, v, vm, anchors, steps = _adamr_tensors(device, seed)
    v_mean = torch.tensor(0.37, dtype=torch.float64, device=device)
    first = [torch.zeros((), device=device) for _ in steps[:2]]
    return [((params, grads, m, v, vm, anchors, steps, v_mean), adamr_hyper()),
            ((params[:2], grads[:2], m[:2], v[:2], [], anchors[:2], first, None), adamr_hyper(l1=True))]


def adamr_v_hat_sum_samples(device, *, seed: int = 0):
    """(args, kwargs) of adamr_v_hat_sum, with and without AMSGrad's running max."""
    _, grads, _, v, vm, _, steps = _adamr_tensors(device, seed)
    return [((grads, v, vm, steps), dict(beta2=HYPER[2])), ((grads[:3], v[:3], [], steps[:3]), dict(beta2=0.999))]
