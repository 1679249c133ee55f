"""ModelEMA against timm ModelEmaV3's formulas, AveragedModel, and NTK-CL's task-mean decay."""
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


def _timm_get_decay(step, decay, min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power):
    """timm ModelEmaV3.get_decay, written out."""
    if step is None:
        return decay
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        d = 1 - (1 + step / warmup_gamma) ** -warmup_power
        return max(min(d, decay), min_decay)
    return decay


def _timm_update(ema_module, model, decay, exclude_buffers):
    """timm ModelEmaV3.apply_update_ / apply_update_no_buffers_ (foreach lerp), in fp64."""
    with torch.no_grad():
        if exclude_buffers:
            for e, m in zip(ema_module.parameters(), model.parameters()):
                e.lerp_(m.to(e.dtype), 1 - decay)
            for e, m in zip(ema_module.buffers(), model.buffers()):
                e.copy_(m)
            return
        for e, m in zip(ema_module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(m.to(e.dtype), 1 - decay)
            else:
                e.copy_(m)


@pytest.mark.parametrize("use_warmup", [False, True])
@pytest.mark.parametrize("update_after_step", [0, 3])
@pytest.mark.parametrize("min_decay", [0.0, 0.5])
def test_get_decay_is_timm_formula(use_warmup, update_after_step, min_decay):
    kw = dict(decay=0.999, min_decay=min_decay, update_after_step=update_after_step, use_warmup=use_warmup,
              warmup_gamma=1.5, warmup_power=0.75)
    ema = ModelEMA(_net(), **kw)
    for step in [None, 0, 1, 2, 3, 4, 5, 10, 100, 10_000, 10**7]:
        assert ema.get_decay(step) == _timm_get_decay(step, **kw)


@pytest.mark.parametrize("exclude_buffers", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_update_matches_timm(exclude_buffers, backend):
    model = _net(torch.float64)
    ours = ModelEMA(model, decay=0.9, use_warmup=True, exclude_buffers=exclude_buffers, backend=backend)
    theirs = copy.deepcopy(model).eval()
    for step in range(1, 6):
        _perturb(model, step)
        ours.update(model, step)
        _timm_update(theirs, model, _timm_get_decay(step, 0.9, 0.0, 0, True, 1.0, 2 / 3), exclude_buffers)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_copy_is_eval_frozen_and_forward_calls_it():
    model = _net()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    x = torch.randn(4, 7)
    torch.testing.assert_close(ema(x), model.eval()(x))


def test_dtype_keeps_an_fp32_average_of_a_bf16_model():
    model = _net(torch.bfloat16)
    ema = ModelEMA(model, decay=0.5, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    assert ema.module[1].num_batches_tracked.dtype == torch.int64
    start = [p.detach().clone().float() for p in ema.module.parameters()]
    _perturb(model, 1)
    ema.update(model)
    for p, s, m in zip(ema.module.parameters(), start, model.parameters()):
        torch.testing.assert_close(p, s + 0.5 * (m.float() - s), rtol=1e-6, atol=1e-6)
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item()


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
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        ema_multi_avg_fn(1.5)


def test_mismatched_model_raises():
    ema = ModelEMA(_net())
    with pytest.raises(ValueError, match="parameters"):
        ema.update(torch.nn.Linear(3, 3))


def test_backends_has_exactly_the_contract_keys():
    b = ntkcl_fast.backends()
    assert set(b) == {"torch", "cpu", "cuda", "triton"} and b["torch"] is True


def test_timm_positional_order_and_foreach():
    """ModelEmaV3(model, decay, min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power,
    device, foreach, exclude_buffers)."""
    ema = ModelEMA(_net(), 0.99, 0.1, 3, True, 2.0, 0.5, "cpu", False, True)
    assert (ema.decay, ema.min_decay, ema.update_after_step, ema.use_warmup) == (0.99, 0.1, 3, True)
    assert (ema.warmup_gamma, ema.warmup_power, ema.device, ema.exclude_buffers) == (2.0, 0.5, "cpu", True)
    assert ema.get_decay(10) == _timm_get_decay(10, 0.99, 0.1, 3, True, 2.0, 0.5)


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
