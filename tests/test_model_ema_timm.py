"""ModelEMA against the installed timm's own ModelEmaV3.

timm/utils/model_ema.py is loaded by path: it needs only torch, while importing the timm package
pulls in torchvision, which does not install beside every torch (`make test` installs timm with
--no-deps for that reason).
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from bench.bench_ema import TIMM  # timm/utils/model_ema.py loaded by path: one loader for tests and bench
from ntkcl_fast import ModelEMA

from ._helpers import device_backends, interpreted_triton
from .test_model_ema import _bf16_pair

pytestmark = pytest.mark.skipif(TIMM is None, reason="timm is not installed (`make test` installs it)")
PAIRS = device_backends("ema_update_")


def test_installed_timm_is_the_one_we_follow():
    version = tuple(int(p) for p in importlib.metadata.version("timm").split(".")[:3])
    assert version >= (1, 0, 31), "ModelEmaV3 gained dtype and stochastic rounding in timm 1.0.31"


class _Net(torch.nn.Module):
    """BatchNorm (float and int buffers) and a non-persistent buffer, which timm's state_dict() skips."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = torch.nn.Linear(7, 13), torch.nn.BatchNorm1d(13), torch.nn.Linear(13, 3)
        self.register_buffer("scale", torch.rand(13) + 0.5, persistent=False)

    def forward(self, x):
        return self.fc2(self.bn(self.fc1(x)) * self.scale)


def _net(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return _Net().to(device, dtype)


def _perturb(net, seed):
    """A training step's worth of change to every tensor, buffers included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(net.parameters()) + [net.bn.running_mean, net.bn.running_var, net.scale]:
            t.add_(torch.randn(t.shape, generator=gen).abs_().to(t.device, t.dtype))
        net.bn.num_batches_tracked.add_(3)


def _tensors(module):
    """Every parameter and buffer, the non-persistent one too, by name."""
    return dict(list(module.named_parameters()) + list(module.named_buffers()))


def _assert_equal(ours, theirs, *, ulps=0):
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        if ulps and a[name].is_floating_point():
            bound = ulps * torch.finfo(a[name].dtype).eps * b[name].double().abs().clamp_min(1.0)
            assert ((a[name].double() - b[name].double()).abs() <= bound).all(), name
        else:
            assert torch.equal(a[name], b[name]), name


CONFIGS = [dict(decay=0.9), dict(decay=0.999, use_warmup=True), dict(decay=0.99, use_warmup=True, min_decay=0.5,
           update_after_step=2, warmup_gamma=1.5, warmup_power=0.75)]


@pytest.mark.parametrize("kw", CONFIGS)
def test_get_decay_is_timms(kw):
    ours, theirs = ModelEMA(_net(), **kw), TIMM.ModelEmaV3(_net(), **kw)
    for step in [None, 0, 1, 2, 3, 4, 5, 10, 100, 10_000, 10**7]:
        assert ours.get_decay(step) == theirs.get_decay(step), step


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("exclude_buffers", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kw", CONFIGS[1:])
def test_update_equals_timm_bit_for_bit(device, backend, dtype, exclude_buffers, foreach, kw):
    """Same dtype for average and model: both compute torch.lerp, so every bit agrees, decay 0 (the
    warmup's first step) included; the non-persistent buffer is left alone unless exclude_buffers.
    16-bit averages without stochastic rounding round the fp32 lerp once in both."""
    model = _net(dtype, device)
    ours = ModelEMA(model, foreach=foreach, exclude_buffers=exclude_buffers, backend=backend, **kw)
    theirs = TIMM.ModelEmaV3(model, foreach=foreach, exclude_buffers=exclude_buffers, stochastic_rounding=False, **kw)
    for step in range(1, 7):
        _perturb(model, step)
        ours.update(model, step)
        theirs.update(model, step)
    _perturb(model, 7)
    ours.update(model)
    theirs.update(model)
    # Triton's interpreter rounds fp32 -> bf16 its own way (an ulp per update at most); GPUs are exact
    _assert_equal(ours.module, theirs.module, ulps=7 if interpreted_triton(backend, device) and
                  dtype == torch.bfloat16 else 0)
    assert torch.equal(ours.module.scale, model.scale) == exclude_buffers


def test_non_persistent_buffer_is_left_alone_as_timm_does():
    model = _net()
    ours, theirs = ModelEMA(model, 0.5), TIMM.ModelEmaV3(model, 0.5)
    start = ours.module.scale.clone()
    _perturb(model, 1)
    ours.update(model)
    theirs.update(model)
    assert torch.equal(ours.module.scale, start) and torch.equal(theirs.module.scale, start)
    ours.set(model)
    theirs.set(model)
    _assert_equal(ours.module, theirs.module)
    assert torch.equal(ours.module.scale, start)


@pytest.mark.parametrize("foreach", [True, False])
def test_fp32_average_of_a_bf16_model(foreach):
    """timm's per-tensor path lerps `model.to(fp32)`: equal bits. Its foreach path on mixed dtypes
    computes `ema * (1 - w) + w * model` (two roundings, an ulp from the lerp), and the difference
    decays with the average: within 2 fp32 ulps per update."""
    model = _net(torch.bfloat16)
    ours = ModelEMA(model, 0.9, dtype=torch.float32)
    theirs = TIMM.ModelEmaV3(model, 0.9, dtype=torch.float32, foreach=foreach)
    for step in range(5):
        _perturb(model, 10 + step)
        ours.update(model)
        theirs.update(model)
    _assert_equal(ours.module, theirs.module, ulps=0 if not foreach else 2 * 5)


def test_positional_arguments_in_timms_order():
    """ModelEmaV3(model, decay, min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power,
    device, dtype, stochastic_rounding, stochastic_rounding_seed, foreach, exclude_buffers)."""
    args = (0.99, 0.1, 1, True, 2.0, 0.5, "cpu", torch.float64, False, 5, False, True)
    model = _net()
    ours, theirs = ModelEMA(model, *args), TIMM.ModelEmaV3(model, *args)
    for name in ("decay", "min_decay", "update_after_step", "use_warmup", "warmup_gamma", "warmup_power", "device",
                 "dtype", "stochastic_rounding", "stochastic_rounding_seed", "foreach", "exclude_buffers"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for step in range(1, 5):  # fp64 average, buffers copied (exclude_buffers), per-tensor lerp: equal bits
        _perturb(model, 20 + step)
        ours.update(model, step)
        theirs.update(model, step)
    _assert_equal(ours.module, theirs.module)


def test_bf16_stochastic_rounding_moves_like_timms():
    """300 updates at decay 0.9999. Both average in fp32 and round stochastically, so the expected
    weight is the fp32 average 2 - 0.9999**300 (1.0296); the random draws differ (timm: its
    torch.Generator adding random low bits before truncation; ours: Philox), so the bits differ
    and the test compares statistics: each mean within 6 standard errors of that value, and of
    each other. Without stochastic rounding both stall at exactly 1.0."""
    # a bf16 model at 1.0 training toward 2.0: at decay 0.9999 one update moves the average by
    # 1e-4, far under half a bf16 ulp (2**-8), so round-to-nearest never moves it
    model, trained = _bf16_pair(16384)
    ours = ModelEMA(model, 0.9999, stochastic_rounding=True, stochastic_rounding_seed=1)
    theirs = TIMM.ModelEmaV3(model, 0.9999, stochastic_rounding=True, stochastic_rounding_seed=1)
    plain_ours = ModelEMA(model, 0.9999)
    plain_theirs = TIMM.ModelEmaV3(model, 0.9999, stochastic_rounding=False)
    for _ in range(300):
        for ema in (ours, theirs, plain_ours, plain_theirs):
            ema.update(trained)
    assert plain_ours.module.weight.eq(1.0).all() and plain_theirs.module.weight.eq(1.0).all()
    expected = 2 - 0.9999 ** 300
    w_ours, w_theirs = ours.module.weight.double(), theirs.module.weight.double()
    se_ours, se_theirs = (w.std().item() / w.numel() ** 0.5 for w in (w_ours, w_theirs))
    assert se_ours > 0 and se_theirs > 0
    assert abs(w_ours.mean().item() - expected) < 6 * se_ours
    assert abs(w_theirs.mean().item() - expected) < 6 * se_theirs
    assert abs(w_ours.mean().item() - w_theirs.mean().item()) < 6 * (se_ours ** 2 + se_theirs ** 2) ** 0.5
    assert 0.5 < w_ours.std().item() / w_theirs.std().item() < 2.0  # the same spread around the mean
