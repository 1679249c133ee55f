"""AdamR on every backend: against torch.optim.Adam / AdamW plus the pull written out
(pull_scale="lr"), against the reference (DAREx's stable pull, AMSGrad, several groups), in low
precision against an fp64 oracle, and its state across state_dict() and skipped gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from ntkcl_fast import AdamR, _backend
from ntkcl_fast.reference import adamr as reference

from ._helpers import assert_within_budget, device_backends, interpreted_triton
from ._penalty_samples import adamr_hyper, adamr_samples, adamr_v_hat_sum_samples

PAIRS = device_backends("adamr_step_")
SHAPES = [(1,), (3,), (1023,), (65537,), (17, 33)]


def _params(device, dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("pull_norm", ["l2", "l1"])
@pytest.mark.parametrize("weight_decay,amsgrad", [(0.0, False), (0.05, False), (0.05, True)])
def test_lr_scaled_pull_matches_torch_adam_plus_pull(device, backend, pull_norm, weight_decay, amsgrad):
    mine = _params(device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    anchors = [p.detach().clone() for p in mine]
    lr, pull = 1e-2, 0.3
    opt = AdamR(mine, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, pull=pull,
                pull_norm=pull_norm, pull_scale="lr", amsgrad=amsgrad, backend=backend)
    ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref = ref_cls(theirs, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, amsgrad=amsgrad,
                  foreach=False)
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
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for p, q in zip(mine, ref.param_groups[0]["params"]):
        for key in keys:
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key])
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 4


def _groups(params):
    return [{"params": params[:2], "lr": 0.02, "amsgrad": True},
            {"params": params[2:4], "pull_norm": "l1", "betas": (0.8, 0.99)},
            {"params": params[4:], "pull": 0.0}]  # no pull: still part of V (DAREx sums every parameter)


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p.values[1] != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_pull_matches_the_reference(device, backend, dtype):
    results = []
    for name in ("torch", backend):
        params = _params(device, dtype, seed=3)
        opt = AdamR(_groups(params), lr=1e-2, eps=1e-6, weight_decay=0.01, pull=0.4, backend=name)
        with torch.no_grad():
            for p in params:
                p.add_(0.25)  # away from the anchors
        for step in range(3):
            _set_grads(params, step)
            if step == 1:
                params[2].grad = None  # skipped: out of V this step, its count falls behind
            opt.step()
        results.append((params, opt))
    (p_ref, o_ref), (p_out, o_out) = results
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
    for a, b in zip(p_out, p_ref):
        torch.testing.assert_close(a, b, **tol)
        for key in o_ref.state[b]:
            torch.testing.assert_close(o_out.state[a][key], o_ref.state[b][key], **tol)
    assert [o_out.state[p]["step"].item() for p in p_out] == [3, 3, 2, 3, 3]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("pull_scale", ["stable", "lr"])
def test_low_precision_params_within_budget(device, backend, dtype, pull_scale):
    mine = _params(device, dtype, seed=1)
    start = [p.detach().clone() for p in mine]
    anchors = [(p.detach().float() + 0.1).to(dtype) for p in mine]
    opt = AdamR(mine, lr=1e-2, pull=0.5, pull_scale=pull_scale, anchors=anchors, backend=backend)
    _set_grads(mine, 0)
    grads = [p.grad.clone() for p in mine]
    opt.step()
    # oracle: the same step in fp64
    g64 = [g.double() for g in grads]
    want = [s.double() for s in start]
    m, v = [torch.zeros_like(w) for w in want], [torch.zeros_like(w) for w in want]
    steps = [torch.zeros((), device=device) for _ in want]
    v_mean = None
    if pull_scale == "stable":
        v_mean = reference.adamr_v_hat_sum(g64, v, [], steps, beta2=0.999) / sum(w.numel() for w in want)
    reference.adamr_step_(want, g64, m, v, [], [a.double() for a in anchors], steps, v_mean, lr=1e-2, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.0, pull=0.5, l1=False)
    # eager: torch.optim.Adam in the params' dtype, the pull applied in that dtype first
    coef = 0.5 * 1e-2 / (v_mean.sqrt().item() if v_mean is not None else 1.0)
    eager = [torch.nn.Parameter(s.clone()) for s in start]
    adam = torch.optim.Adam(eager, lr=1e-2, foreach=False)
    with torch.no_grad():
        for e, a, g in zip(eager, anchors, grads):
            e.grad = g.clone()
            e.sub_(coef * (e - a))
    adam.step()
    extra = 1 if interpreted_triton(backend, device) else 0
    for i, (p, w, e) in enumerate(zip(mine, want, eager)):
        assert p.dtype == dtype
        assert_within_budget(p.detach(), w, e.detach(), extra_ulps=extra, what=f"param {i}")
        assert opt.state[p]["exp_avg"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_v_hat_sum_matches_the_reference(device, backend):
    for args, kwargs in adamr_v_hat_sum_samples(device):
        want = reference.adamr_v_hat_sum(*args, **kwargs)
        if backend == "torch":
            continue  # the reference itself
        got = _backend.kernel(backend, "adamr_v_hat_sum")(*args, **kwargs)
        assert got.dtype == torch.float64 and got.dim() == 0 and got.device == want.device
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_zero_second_moment_reads_as_one():
    """DAREx: sqrt(V) is replaced by 1 when V == 0 (every gradient zero at the first step)."""
    p = torch.nn.Parameter(torch.full((5,), 2.0))
    opt = AdamR([p], lr=0.1, pull=0.5, anchors=[torch.zeros(5)])
    p.grad = torch.zeros(5)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((5,), 2.0 - 0.1 * 0.5 * 2.0))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip(device, backend, amsgrad):
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)).to(device, torch.bfloat16)
    twin = copy.deepcopy(model)
    opt = AdamR(model.parameters(), lr=1e-2, pull=0.1, amsgrad=amsgrad, backend=backend)
    for step in range(2):
        _set_grads(list(model.parameters()), step)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    with torch.no_grad():
        for a, b in zip(twin.parameters(), model.parameters()):
            a.copy_(b)
    opt2 = AdamR(twin.parameters(), lr=1.0, pull=0.0, backend=backend)  # hyperparameters come from sd
    opt2.load_state_dict(sd)
    keys = ("exp_avg", "exp_avg_sq", "anchor", "step") + (("max_exp_avg_sq",) if amsgrad else ())
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in keys:
            assert opt2.state[q][key].dtype == opt.state[p][key].dtype
            assert opt2.state[q][key].device == q.device
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
    with torch.no_grad():
        p.mul_(1.5)
    p.grad = torch.randn(6, 9, device=device)
    anchor = opt.state[p]["anchor"].double()
    want = p.detach().double().clone()
    g64 = [p.grad.double()]
    m, v, steps = [torch.zeros_like(want)], [torch.zeros_like(want)], [torch.zeros((), device=device)]
    v_mean = reference.adamr_v_hat_sum(g64, v, [], steps, beta2=0.999) / want.numel()  # q has no grad: not in V
    reference.adamr_step_([want], g64, m, v, [], [anchor], steps, v_mean, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, pull=1.0, l1=False)
    q_before = q.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(q.detach(), q_before) and opt.state[q]["step"].item() == 0


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    cases = [(dict(lr=-1.0), ValueError, "lr"), (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
             (dict(pull_norm="l3"), ValueError, "pull_norm"), (dict(pull=float("nan")), ValueError, "pull"),
             (dict(pull_scale="sqrt"), ValueError, "pull_scale"), (dict(amsgrad=1), TypeError, "amsgrad"),
             (dict(anchors=[torch.zeros(4)]), ValueError, "anchors"), (dict(eps=-1.0), ValueError, "eps")]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            AdamR(p, **kwargs)
    opt = AdamR(p)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.pull_scale"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "pull_scale": "none"})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="backend"):
        opt = AdamR(p, backend="fast")
        p[0].grad = torch.ones(3)
        opt.step()


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
def test_kernel_checks_its_arguments():
    (params, grads, m, v, vm, anchors, steps, v_mean), kwargs = adamr_samples("cpu")[0]
    op = torch.ops.ntkcl_fast.adamr_step_
    with pytest.raises(ValueError, match="beta1"):
        op(params, grads, m, v, vm, anchors, steps, v_mean, **adamr_hyper(beta1=1.0))
    with pytest.raises(ValueError, match="anchors"):
        op(params, grads, m, v, vm, anchors[:1], steps, v_mean, **kwargs)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        op(params, grads, m, v, vm[:2], anchors, steps, v_mean, **kwargs)
    with pytest.raises(TypeError, match=r"state_steps\[0\]"):
        op(params, grads, m, v, vm, anchors, [s.double() for s in steps], v_mean, **kwargs)
    with pytest.raises(ValueError, match="v_mean"):
        op(params, grads, m, v, vm, anchors, steps, v_mean.reshape(1), **kwargs)
    with pytest.raises(ValueError, match=r"state_steps\[1\]"):
        torch.ops.ntkcl_fast.adamr_v_hat_sum(grads, v, vm, [steps[0], steps[1].reshape(1)] + steps[2:], beta2=0.9)


def test_param_groups_and_closure():
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(3))
    opt = AdamR([{"params": [a], "lr": 0.1, "pull": 1.0}, {"params": [b], "lr": 0.01, "pull_norm": "l1"}],
                pull=0.5, pull_scale="lr")
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
