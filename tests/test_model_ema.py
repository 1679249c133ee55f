"""ModelEMA's own behaviour, AveragedModel, and NTK-CL's task-mean decay (timm parity: test_model_ema_timm.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ntkcl_fast
from ntkcl_fast import ModelEMA, ema_multi_avg_fn


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.BatchNorm1d(13), torch.nn.Linear(13, 3))
    return net.to(dtype)


def _perturb(net, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.add_(1.0)
                m.num_batches_tracked.add_(3)


def test_copy_is_eval_frozen_and_forward_calls_it():
    model = _net()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    x = torch.randn(4, 7)
    torch.testing.assert_close(ema(x), model.eval()(x))


def test_decay_override_and_set():
    model = _net()
    ema = ModelEMA(model, decay=0.9999)
    _perturb(model, 2)
    ema.update(model, decay=0.0)  # a decay of 0 copies
    for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    _perturb(model, 3)
    ema.set(model)
    for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decay"):
        ema.update(model, decay=2.0)


def test_tied_weights_are_averaged_once():
    """timm walks state_dict(), which lists a tied weight under each name, and so lerps it twice
    per update (decay squared); named_parameters() lists it once."""
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    ema = ModelEMA(model, decay=0.5)
    start = ema.module[0].weight.detach().clone()
    _perturb(model, 4)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, start + 0.5 * (model[0].weight - start))
    assert ema.module[1].weight is ema.module[0].weight


def test_task_mean_decay_gives_the_mean_of_end_of_task_weights():
    model = _net(torch.float64)
    ema = ModelEMA(model, backend="cpu")
    ends = []
    for task in range(5):
        _perturb(model, 10 + task)
        ends.append([p.detach().clone() for p in model.parameters()])
        ema.update(model, decay=ModelEMA.task_mean_decay(task))
    for i, p in enumerate(ema.module.parameters()):
        torch.testing.assert_close(p, torch.stack([e[i] for e in ends]).mean(0), rtol=1e-12, atol=1e-12)
    assert ModelEMA.task_mean_decay(0) == 0.0 and ModelEMA.task_mean_decay(3) == 0.75
    with pytest.raises(ValueError, match="task_index"):
        ModelEMA.task_mean_decay(-1)


def test_multi_avg_fn_matches_torch_averaged_model():
    model = _net()
    ours = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.9), use_buffers=True)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for step in range(4):
        _perturb(model, 20 + step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for a, b in zip(ours.module.state_dict().values(), theirs.module.state_dict().values()):
        assert torch.equal(a, b)  # both torch.lerp's rounding (int buffers: torch's formula)
    with pytest.raises(ValueError, match="decay"):
        ema_multi_avg_fn(1.5)


def test_mismatched_model_raises():
    ema = ModelEMA(_net())
    with pytest.raises(ValueError, match="parameters"):
        ema.update(torch.nn.Linear(3, 3))


def test_backends_has_exactly_the_contract_keys():
    b = ntkcl_fast.backends()
    assert set(b) == {"torch", "cpu", "cuda", "triton"} and b["torch"] is True


def _bf16_pair(n=20000):
    model = torch.nn.Linear(n, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.weight.fill_(2.0)
    return model, trained


def test_stochastic_rounding_keeps_a_slow_average_moving():
    """decay 0.999 from 1 toward 2: the fp32 average 1.001 is under half a bf16 ulp (2**-8) from 1,
    so round-to-nearest stalls at 1; stochastic rounding is unbiased (mean 1.001 within 5 sigma)."""
    model, trained = _bf16_pair()
    plain = ModelEMA(model, 0.999)
    plain.update(trained)
    assert plain.module.weight.eq(1.0).all()
    ema = ModelEMA(model, 0.999, stochastic_rounding=True, stochastic_rounding_seed=7)
    ema.update(trained)
    w = ema.module.weight.float()
    up = 1.0 + 2.0 ** -7  # the next bf16 above 1
    assert ((w == 1.0) | (w == up)).all()
    p = (1.001 - 1.0) / (up - 1.0)
    n = w.numel()
    assert abs(int((w == up).sum()) - n * p) <= 5 * (n * p * (1 - p)) ** 0.5


def test_stochastic_rounding_seed_reproduces_and_fp32_is_untouched():
    model, trained = _bf16_pair(300)
    runs = []
    for _ in range(2):
        ema = ModelEMA(model, 0.999, stochastic_rounding=True, stochastic_rounding_seed=3)
        ema.update(trained)
        runs.append(ema.module.weight.clone())
    assert torch.equal(runs[0], runs[1])
    fp32 = ModelEMA(model, 0.999, stochastic_rounding=True, dtype=torch.float32)
    fp32.update(trained)
    torch.testing.assert_close(fp32.module.weight, torch.full_like(fp32.module.weight, 1.001), rtol=0, atol=1e-7)


def test_stochastic_rounding_propagates_nan_and_inf():
    from ntkcl_fast.ema import _stochastic_round_
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, 70000.0])
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(5, dtype=dtype)
        _stochastic_round_(out, x, 0, 0, torch.zeros((), dtype=torch.int64))
        assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf") and out[3] == 1.0
        if dtype == torch.float16:  # beyond fp16's range: inf, as round-to-nearest gives
            assert out[4] == float("inf")
        else:  # one of the two bf16 neighbours
            assert out[4].item() in (69632.0, 70144.0)
