"""AdamR against torch.optim.Adam / AdamW plus the pull written out, on every backend."""
from __future__ import annotations

import copy

import pytest
import torch

from ntkcl_fast import AdamR, _backend
from ntkcl_fast.reference import adamr as reference

from ._helpers import assert_within_budget, device_backends, interpreted_triton
from ._penalty_samples import adamr_samples

PAIRS = device_backends("adamr_step_")
SHAPES = [(1,), (3,), (1023,), (65537,), (17, 33)]


def _params(device, dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _pull_then(opt_step, params, anchors, lr, pull, l1):
    with torch.no_grad():
        for p, a in zip(params, anchors):
            d = p - a
            p.sub_(lr * pull * (torch.sign(d) if l1 else d))
    opt_step()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pull_norm", ["l2", "l1"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_matches_torch_adam_plus_pull(device, backend, pull_norm, weight_decay):
    mine = _params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    anchors = [p.detach().clone() for p in mine]
    lr, pull = 1e-2, 0.3
    opt = AdamR(mine, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, pull=pull,
                pull_norm=pull_norm, backend=backend)
    ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref = ref_cls(theirs, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, foreach=False)
    for step in range(4):
        _set_grads(mine, step)
        _set_grads(theirs, step)
        opt.step()
        # AdamW decays p before the step; the pull is computed from the same pre-step p
        with torch.no_grad():
            drift = [(torch.sign(p - a) if pull_norm == "l1" else p - a) for p, a in zip(theirs, anchors)]
        ref.step()
        with torch.no_grad():
            for p, d in zip(theirs, drift):
                p.sub_(lr * pull * d)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    for p, q in zip(mine, ref.param_groups[0]["params"]):
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_params_within_budget(device, backend, dtype):
    mine = _params(device, dtype, seed=1)
    start = [p.detach().clone() for p in mine]
    anchors = [(p.detach().float() + 0.1).to(dtype) for p in mine]
    opt = AdamR(mine, lr=1e-2, pull=0.5, anchors=anchors, backend=backend)
    _set_grads(mine, 0)
    grads = [p.grad.clone() for p in mine]
    opt.step()
    # oracle: the same step in fp64
    want = [s.double() for s in start]
    m = [torch.zeros_like(w) for w in want]
    v = [torch.zeros_like(w) for w in want]
    reference.adamr_step_(want, [g.double() for g in grads], m, v, [a.double() for a in anchors], lr=1e-2,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, pull=0.5, l1=False, step=1)
    # eager: torch.optim.Adam in the params' dtype plus the pull
    eager = [torch.nn.Parameter(s.clone()) for s in start]
    adam = torch.optim.Adam(eager, lr=1e-2, foreach=False)
    for e, g in zip(eager, grads):
        e.grad = g.clone()
    _pull_then(adam.step, eager, anchors, 1e-2, 0.5, False)
    extra = 1 if interpreted_triton(backend, device) else 0
    for i, (p, w, e) in enumerate(zip(mine, want, eager)):
        assert p.dtype == dtype
        assert_within_budget(p.detach(), w, e.detach(), extra_ulps=extra, what=f"param {i}")
        assert opt.state[p]["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_state_dict_round_trip(device, backend):
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(device, torch.bfloat16)
    twin = copy.deepcopy(model)
    opt = AdamR(model.parameters(), lr=1e-2, pull=0.1, backend=backend)
    for step in range(2):
        _set_grads(list(model.parameters()), step)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        for a, b in zip(twin.parameters(), model.parameters()):
            a.copy_(b)
    opt2 = AdamR(twin.parameters(), lr=1.0, pull=0.0, backend=backend)  # hyperparameters come from sd
    opt2.load_state_dict(sd)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "anchor"):
            assert opt2.state[q][key].dtype == opt.state[p][key].dtype
            assert torch.equal(opt2.state[q][key], opt.state[p][key])
    for step in range(2, 4):
        _set_grads(list(model.parameters()), step)
        _set_grads(list(twin.parameters()), step)
        opt.step()
        opt2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_params_and_skipped_grads(device, backend):
    base = torch.randn(9, 6, device=device)
    p = torch.nn.Parameter(base.t())  # a non-contiguous leaf
    q = torch.nn.Parameter(torch.randn(4, device=device))
    opt = AdamR([p, q], lr=0.1, pull=1.0, backend=backend)
    p.grad = torch.randn(6, 9, device=device)
    want = p.detach().double().clone()
    m, v = torch.zeros_like(want), torch.zeros_like(want)
    reference.adamr_step_([want], [p.grad.double()], [m], [v], [want.clone()], lr=0.1, beta1=0.9, beta2=0.999,
                          eps=1e-8, weight_decay=0.0, pull=1.0, l1=False, step=1)
    q_before = q.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(q.detach(), q_before) and "step" not in opt.state[q]


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="lr"):
        AdamR(p, lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        AdamR(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="pull_norm"):
        AdamR(p, pull_norm="l3")
    with pytest.raises(ValueError, match="pull"):
        AdamR(p, pull=float("nan"))
    with pytest.raises(ValueError, match="anchors"):
        AdamR(p, anchors=[torch.zeros(4)])
    with pytest.raises(ValueError, match="backend"):
        opt = AdamR(p, backend="fast")
        p[0].grad = torch.ones(3)
        opt.step()


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
def test_kernel_checks_its_arguments():
    params, grads, m, v, anchors, hyper, l1 = adamr_samples("cpu")[0]
    with pytest.raises(ValueError, match="hyper"):
        torch.ops.ntkcl_fast.adamr_step_(params, grads, m, v, anchors, hyper[:3], l1)
    with pytest.raises(ValueError, match="anchors"):
        torch.ops.ntkcl_fast.adamr_step_(params, grads, m, v, anchors[:1], hyper, l1)


def test_param_groups_and_closure():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3))
    opt = AdamR([{"params": [a], "lr": 0.1, "pull": 1.0}, {"params": [b], "lr": 0.01, "pull_norm": "l1"}],
                pull=0.5)
    ref = torch.optim.Adam([{"params": [a2 := torch.nn.Parameter(a.detach().clone())], "lr": 0.1},
                            {"params": [b2 := torch.nn.Parameter(b.detach().clone())], "lr": 0.01}], foreach=False)
    anchors = [a.detach().clone(), b.detach().clone()]

    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum() + (b ** 3).sum()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        assert loss is not None
        ref.zero_grad()
        ((a2 ** 2).sum() + (b2 ** 3).sum()).backward()
        with torch.no_grad():
            da, db = a2 - anchors[0], torch.sign(b2 - anchors[1])
        ref.step()
        with torch.no_grad():
            a2.sub_(0.1 * 1.0 * da)
            b2.sub_(0.01 * 0.5 * db)
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)
