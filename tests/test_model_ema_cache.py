"""ModelEMA.update's cached tensor lists: equal to a fresh walk of both models, and rebuilt
whenever the model or the average changes what a walk would find."""
from __future__ import annotations

import copy
from itertools import chain

import pytest
import torch

from ntkcl_fast import ModelEMA
from ntkcl_fast._model_ema_plan import UpdatePlan


class _Net(torch.nn.Module):
    """Parameters, a tied weight, float and int buffers and a non-persistent buffer."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(5, 7)
        self.fc = torch.nn.Linear(7, 13)
        self.bn = torch.nn.BatchNorm1d(13)
        self.out = torch.nn.Linear(13, 5, bias=False)
        self.out.weight = torch.nn.Parameter(torch.randn(5, 13))
        self.tied = torch.nn.Linear(7, 5, bias=False)
        self.tied.weight = self.embed.weight
        self.register_buffer("scratch", torch.randn(3), persistent=False)
        self.to(dtype)


def _perturb(net, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in chain(net.parameters(), net.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen).to(t.dtype))
            else:
                t.add_(3)


def _state(ema):
    return [t.detach().clone() for t in chain(ema.module.parameters(), ema.module.buffers())]


def _assert_same(a, b):
    if isinstance(a, type) or isinstance(b, type):
        assert a is b
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


CONFIGS = {
    "fp32": (torch.float32, {}),
    "fp32 average of bf16": (torch.bfloat16, {"dtype": torch.float32}),
    "bf16 stochastic": (torch.bfloat16, {"stochastic_rounding": True, "stochastic_rounding_seed": 5}),
    "exclude_buffers": (torch.float32, {"exclude_buffers": True}),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cached_updates_equal_a_fresh_walk_over_many_steps(config):
    dtype, kwargs = CONFIGS[config]
    model = _Net(dtype)
    cached = ModelEMA(model, 0.9, **kwargs)
    walked = copy.deepcopy(cached)
    assert walked._plan is None  # deepcopy leaves the plan (and the model it refers to) behind
    plans = set()
    for step in range(6):
        _perturb(model, step)
        cached.update(model)
        plans.add(id(cached._plan))
        walked._plan = None  # a fresh walk every call: the uncached behaviour
        walked.update(model)
        _assert_same(_state(cached), _state(walked))
    assert len(plans) == 1, "the plan must be reused while nothing changes"


def _replace_param(model, average):
    model.fc.weight = torch.nn.Parameter(torch.randn_like(model.fc.weight) + 5)


def _swap_data(model, average):
    model.fc.weight.data = torch.randn_like(model.fc.weight) + 5


def _swap_data_new_dtype(model, average):
    model.fc.weight.data = (torch.randn_like(model.fc.weight) + 5).double()


def _to_float64(model, average):
    model.to(torch.float64)


def _to_float64_new_params(model, average):
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def _load_assign(model, average):
    state = {k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def _module_added(model, average):
    model.extra = torch.nn.Linear(3, 3)


def _module_added_to_both(model, average):
    torch.manual_seed(1)
    model.extra = torch.nn.Linear(3, 3)
    average.extra = copy.deepcopy(model.extra).requires_grad_(False)
    with torch.no_grad():
        average.extra.weight.zero_()


def _module_replaced_in_both(model, average):
    torch.manual_seed(2)
    model.out = torch.nn.Linear(13, 5, bias=False)
    average.out = torch.nn.Linear(13, 5, bias=False).requires_grad_(False)


def _param_deleted(model, average):
    del model.fc.bias


def _buffer_made_non_persistent(model, average):
    model.bn.register_buffer("running_mean", model.bn.running_mean, persistent=False)


def _buffer_added_where_none_was(model, average):
    model.fc.register_buffer("extra", torch.randn(2))


def _average_buffer_viewed_as_int(model, average):
    """Same storage, another dtype: the data pointer alone would not see it."""
    average.bn.running_var.data = average.bn.running_var.data.view(torch.int32)


def _average_cast_to_bf16(model, average):
    average.to(torch.bfloat16)


def _average_param_replaced(model, average):
    average.fc.weight = torch.nn.Parameter(torch.zeros_like(average.fc.weight), requires_grad=False)


# name -> (mutation, ModelEMA kwargs, whether a plan trusted without checking gives another result:
# False where the plan's live tensors already read the change, and only the check's cost is paid)
CASES = {
    "parameter assigned": (_replace_param, {}, True),
    ".data swapped": (_swap_data, {}, False),
    ".data swapped to fp64": (_swap_data_new_dtype, {}, False),
    "model.to(fp64), in place": (_to_float64, {}, False),
    "model.to(fp64), new Parameters": (_to_float64_new_params, {}, True),
    "load_state_dict(assign=True)": (_load_assign, {}, True),
    "module added to the model only": (_module_added, {}, True),
    "module added to both": (_module_added_to_both, {}, True),
    "module replaced in both": (_module_replaced_in_both, {}, True),
    "parameter deleted": (_param_deleted, {}, True),
    "buffer made non-persistent": (_buffer_made_non_persistent, {}, True),
    "buffer added to a module that had none": (_buffer_added_where_none_was, {}, True),
    "average buffer viewed as int32": (_average_buffer_viewed_as_int, {}, True),
    "average cast to bf16, stochastic rounding": (
        _average_cast_to_bf16, {"stochastic_rounding": True, "stochastic_rounding_seed": 3}, True),
    "average parameter assigned": (_average_param_replaced, {}, True),
}


def _after_change(case, mode, monkeypatch):
    """The average after 3 updates, the change, and 2 more updates: `mode` "cached" (the plan as
    built), "walked" (a fresh walk each call) or "stale" (the plan trusted without its check)."""
    mutate, kwargs, _ = CASES[case]
    model = _Net(torch.float32)
    ema = ModelEMA(model, 0.999, **kwargs)
    for step in range(3):
        _perturb(model, step)
        ema.update(model)
    plan = ema._plan
    mutate(model, ema.module)
    if mode == "stale":
        monkeypatch.setattr(UpdatePlan, "fresh", lambda self: True)
    try:
        for step in range(2):
            _perturb(model, 10 + step)
            if mode == "walked":
                ema._plan = None
            ema.update(model)
    except (ValueError, TypeError) as error:
        return type(error), None
    finally:
        monkeypatch.undo()
    return _state(ema), ema._plan is not plan


@pytest.mark.parametrize("case", list(CASES))
def test_a_change_is_seen_and_the_update_equals_a_fresh_walk(case, monkeypatch):
    cached, rebuilt = _after_change(case, "cached", monkeypatch)
    walked, _ = _after_change(case, "walked", monkeypatch)
    _assert_same(cached, walked)
    assert rebuilt is not False, "the change must rebuild the plan"
    if CASES[case][2]:  # the check is what makes the difference
        stale, _ = _after_change(case, "stale", monkeypatch)
        with pytest.raises(AssertionError):
            _assert_same(stale, walked)


def test_another_model_object_rebuilds():
    model, twin = _Net(torch.float32), _Net(torch.float32)
    _perturb(twin, 1)
    ema = ModelEMA(model, 0.5)
    ema.update(model)
    ema.update(twin)
    assert ema._plan.model is twin
    walked = ModelEMA(model, 0.5)
    walked.update(model)
    walked._plan = None
    walked.update(twin)
    _assert_same(_state(ema), _state(walked))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_moved_to_another_device_rebuilds():
    model = _Net(torch.float32)
    ema = ModelEMA(model, 0.5)
    ema.update(model)
    model.cuda()  # a .data swap per tensor: same Parameters, storage on the GPU
    _perturb(model, 4)
    ema.update(model)
    walked = ModelEMA(_Net(torch.float32), 0.5)
    walked.update(_Net(torch.float32))
    walked._plan = None
    walked.update(model)
    _assert_same(_state(ema), _state(walked))
    assert all(g.moves for g in ema._plan.groups)
