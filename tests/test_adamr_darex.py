"""AdamR against DAREx's own AdamR (github.com/vengdeng/DAREx, AdamR.py), re-implemented here
from that code as a plain per-parameter loop (DAREx is not a package).

Their algorithm, step by step:
  1. for every group, for every parameter with a gradient: step += 1, Adam's moments in place
     (exp_avg, exp_avg_sq; with amsgrad max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq), the raw
     second moment), and add (max_)exp_avg_sq / (1 - beta2^step) summed over its elements to one
     running sum; count the elements.
  2. s = sqrt(sum / count), over ALL groups together; s == 0 becomes 1.
  3. for every group, for every parameter with a gradient, when the group's weight_decay != 0:
     p -= weight_decay * lr / s * D(p - pre) (D = sign with L1, else identity); then
     p -= lr / (1 - beta1^step) * exp_avg / (sqrt((max_)exp_avg_sq / (1 - beta2^step)) + eps).
Names: their `weight_decay` is our `pull`, their `L1` our `pull_norm="l1"`, their `pre_model` our
`anchors`. Their code has no decay toward zero; for our `weight_decay` the loop below adds
AdamW's decoupled decay computed from the same pre-step p as the pull (the contract's order).
Their state lives in the parameter's dtype; ours in fp32 for 16-bit params, so low-precision
runs are judged by the error budget against their loop run in fp64.
"""
from __future__ import annotations

import math

import pytest
import torch

from ntkcl_fast import AdamR

from ._helpers import assert_within_budget, device_backends, interpreted_triton

PAIRS = device_backends("adamr_step_")


class DarexAdamR:
    """DAREx's AdamR step, one parameter at a time; `groups`: dicts with params, pre_model, lr, betas,
    eps, weight_decay (their pull), L1, amsgrad, and `decay` (AdamW's, not theirs; 0 = their code)."""

    def __init__(self, groups):
        self.groups = groups
        self.state = {}

    @torch.no_grad()
    def step(self):
        param_size, v_hat_sum = 0, 0.0
        for group in self.groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_size += p.numel()
                state = self.state.setdefault(p, {})
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                bias_correction2 = 1 - beta2 ** state["step"]
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                if group["amsgrad"]:
                    torch.max(state["max_exp_avg_sq"], state["exp_avg_sq"], out=state["max_exp_avg_sq"])
                    v_hat = state["max_exp_avg_sq"] / bias_correction2
                else:
                    v_hat = state["exp_avg_sq"] / bias_correction2
                v_hat_sum += v_hat.sum()
        mean_sqrt = math.sqrt(v_hat_sum / param_size)
        for group in self.groups:
            beta1, beta2 = group["betas"]
            for p, pre in zip(group["params"], group["pre_model"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                before = p.clone()
                if group["decay"] != 0:
                    p.sub_(group["decay"] * group["lr"] * before)
                if group["weight_decay"] != 0:
                    if mean_sqrt == 0:
                        mean_sqrt = 1
                    drift = torch.sign(before - pre) if group["L1"] else before - pre
                    p.add_(-group["weight_decay"] * group["lr"] / mean_sqrt * drift)
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                second = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
                denom = (second / bias_correction2).sqrt().add(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias_correction1)


SHAPES = [(1,), (3,), (257,), (4099,), (17, 33)]


def _start(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    pre = [x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in start]
    return [x.to(device, dtype) for x in start], [x.to(device, dtype) for x in pre]


def _grads(step, device, dtype, skip=None):
    gen = torch.Generator().manual_seed(1000 + step)
    return [None if i == skip else torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)
            for i, s in enumerate(SHAPES)]


def _split(tensors):
    return tensors[:2], tensors[2:]  # two groups


def _run_ours(device, backend, dtype, *, amsgrad, l1, decay, steps=4):
    start, pre = _start(device, dtype)
    params = [torch.nn.Parameter(x.clone()) for x in start]
    a, b = _split(params)
    opt = AdamR([{"params": a, "lr": 2e-2}, {"params": b, "betas": (0.85, 0.99)}], lr=1e-2, eps=1e-6,
                weight_decay=decay, pull=0.3, pull_norm="l1" if l1 else "l2", amsgrad=amsgrad, anchors=pre,
                backend=backend)
    for k in range(steps):
        for p, g in zip(params, _grads(k, device, dtype, skip=1 if k == 2 else None)):
            p.grad = g
        opt.step()
    return params


def _run_darex(device, dtype, *, amsgrad, l1, decay, steps=4):
    start, pre = _start(device, dtype)
    params = [x.clone() for x in start]
    (a, b), (pre_a, pre_b) = _split(params), _split(pre)
    common = dict(eps=1e-6, weight_decay=0.3, L1=l1, amsgrad=amsgrad, decay=decay)
    opt = DarexAdamR([dict(params=a, pre_model=pre_a, lr=2e-2, betas=(0.9, 0.999), **common),
                      dict(params=b, pre_model=pre_b, lr=1e-2, betas=(0.85, 0.99), **common)])
    for k in range(steps):
        for p, g in zip(params, _grads(k, device, dtype, skip=1 if k == 2 else None)):
            p.grad = g
        opt.step()
    return params


CASES = [dict(amsgrad=False, l1=False, decay=0.0), dict(amsgrad=True, l1=False, decay=0.0),
         dict(amsgrad=False, l1=True, decay=0.0), dict(amsgrad=True, l1=True, decay=0.05),
         dict(amsgrad=False, l1=False, decay=0.05)]
IDS = ["l2", "l2-amsgrad", "l1", "l1-amsgrad-decay", "l2-decay"]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_darex_adamr(device, backend, case, dtype):
    ours = _run_ours(device, backend, dtype, **case)
    theirs = _run_darex(device, dtype, **case)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p.detach(), q, **tol, msg=lambda m, i=i: f"param {i}: {m}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("case", CASES[1:4], ids=IDS[1:4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_budget_of_darex_in_fp64(device, backend, case, dtype):
    ours = _run_ours(device, backend, dtype, **case)
    oracle = _run_darex(device, torch.float64, **case)
    eager = _run_darex(device, dtype, **case)  # their code as written, in the params' dtype
    extra = 1 if interpreted_triton(backend, device) else 0
    for i, (p, w, e) in enumerate(zip(ours, oracle, eager)):
        assert_within_budget(p.detach(), w, e, extra_ulps=extra, what=f"param {i}")
