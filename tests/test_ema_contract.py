"""The op contract of the EMA family: torch.compile(fullgraph=True) equals eager, version counters
and autograd's in-place check, nothing written before an error, meta tensors, opcheck."""
from __future__ import annotations

import copy

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import ModelEMA, _backend, ema_multi_avg_fn

from ._helpers import assert_bumps_versions, assert_unchanged, compiled, device_backends, snapshot
from ._samples_ema_dare import ema_op_samples, ema_samples

PAIRS = device_backends("ema_update_")
SAMPLES = [s[0] for s in ema_samples("cpu")]


def _assert_same(got, want, backend):
    for i, (g, w) in enumerate(zip(got, want)):
        if backend == "torch" and g.is_floating_point():  # inductor may fuse the reference math differently
            torch.testing.assert_close(g, w, msg=f"tensor {i}")
        else:
            assert torch.equal(g, w), f"tensor {i}"


def _clones(tensors):
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_ema_update_compiled_equals_eager(device, backend, sample):
    _, ema, src, decay = next(s for s in ema_samples(device) if s[0] == sample)
    want = _clones(ema)
    ntkcl_fast.ema_update_(want, src, decay, backend=backend)
    fn = compiled(lambda e, s, d: ntkcl_fast.ema_update_(e, s, d, backend=backend))
    fn(ema, src, decay)
    _assert_same(ema, want, backend)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.BatchNorm1d(13), torch.nn.Linear(13, 3))


def _perturbed(net, seed):
    other = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(other.parameters()) + [other[1].running_mean]:
            t.add_(torch.randn(t.shape, generator=gen))
        other[1].num_batches_tracked.add_(3)
    return other


def _state(module):
    return list(module.state_dict().values())


@pytest.mark.parametrize("device,backend", PAIRS)
def test_model_ema_compiled_equals_eager(device, backend):
    net = _net().to(device)
    trained = _perturbed(net, 1)
    eager, comp = ModelEMA(net, 0.9, backend=backend), ModelEMA(net, 0.9, backend=backend)
    eager.update(trained, step=5)
    compiled(lambda: comp.update(trained, step=5))()
    _assert_same(_state(comp.module), _state(eager.module), backend)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(2)).to(device)
    _assert_same([compiled(comp)(x)], [eager(x)], "torch")  # forward is plain torch either way
    eager.set(trained)
    compiled(lambda: comp.set(trained))()
    _assert_same(_state(comp.module), _state(eager.module), backend)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_model_ema_stochastic_rounding_compiled_equals_eager(device, backend):
    net = _net().to(device, torch.bfloat16)
    trained = _perturbed(net, 4)
    kw = dict(stochastic_rounding=True, stochastic_rounding_seed=11, backend=backend)
    eager, comp = ModelEMA(net, 0.999, **kw), ModelEMA(net, 0.999, **kw)
    fn = compiled(lambda: comp.update(trained))
    for _ in range(2):  # the second update draws from the next Philox counters
        eager.update(trained)
        fn()
        _assert_same(_state(comp.module), _state(eager.module), "exact")


def test_stochastic_round_op_passes_opcheck():
    x = torch.randn(1023) * 3
    step = torch.tensor(5, dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float16):
        torch.library.opcheck(torch.ops.ntkcl_fast_reference.stochastic_round_.default,
                              (torch.empty(1023, dtype=dtype), x, -7, 3, step))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_ema_multi_avg_fn_compiled_equals_eager(device):
    _, ema, src, _ = ema_samples(device)[0]  # with an int buffer: torch's own formula for those
    fn = ema_multi_avg_fn(0.8)
    want = _clones(ema)
    fn(want, src, 1)
    compiled(lambda e, s: fn(e, s, 1))(ema, src)
    _assert_same(ema, want, "auto")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_every_written_tensor_bumps_its_version(device, backend, sample):
    _, ema, src, decay = next(s for s in ema_samples(device) if s[0] == sample)
    assert_bumps_versions(lambda: ntkcl_fast.ema_update_(ema, src, decay, backend=backend), ema)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_autograd_detects_an_overwritten_saved_tensor(device, backend, contiguous):
    """`w * a` saves `a` for backward; ema_update_ writing `a` afterwards must make backward raise."""
    a = torch.randn(9, 5, device=device) if contiguous else torch.randn(5, 9, device=device).t()
    w = torch.randn(9, 5, device=device, requires_grad=True)
    loss = (w * a).sum()
    ntkcl_fast.ema_update_(a, torch.randn(9, 5, device=device), 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_model_ema_update_bumps_versions(device, backend):
    net = _net().to(device)
    ema = ModelEMA(net, 0.9, backend=backend)
    weight = ema.module[0].weight
    w = torch.randn_like(weight, requires_grad=True)
    loss = (w * weight).sum()
    assert_bumps_versions(lambda: ema.update(_perturbed(net, 3)), list(ema.module.parameters()))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _bad_lists(device):
    """(error, message, ema, src, decay): index 0 is always valid, so a write before the check shows."""
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)
    shared = t(8)
    return [
        (ValueError, r"ema\[1\].*stride-0", [t(3), t(1, 3).expand(2, 3)], [t(3), t(2, 3)], 0.5),
        (ValueError, r"ema\[1\].*stride-0", [t(4, 3).t(), t(1).expand(5)], [t(3, 4), t(5)], 0.5),
        (ValueError, r"ema\[1\]", [t(3), t(4)], [t(3), t(5)], 0.5),
        (TypeError, r"ema\[1\]", [t(3), t(3)], [t(3), t(3).long()], 0.5),
        (TypeError, r"src\[1\]", [t(3), t(3)], [t(3), t(3, dtype=torch.complex64)], 0.5),
        (ValueError, r"decay\[1\]", [t(3), t(3)], [t(3), t(3)], [0.5, 1.5]),
        (ValueError, "decay", [t(3), t(6)[::2]], [t(3), t(3)], torch.tensor(-0.5)),
        (ValueError, r"shares memory", [t(3), shared[:5]], [t(3), shared[3:]], 0.5),
        (ValueError, r"shares memory", [t(3), shared[:5], shared[4:]], [t(3), t(5), t(4)], 0.5),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "triton"])
@pytest.mark.parametrize("case", range(len(_bad_lists("cpu"))))
def test_bad_list_raises_before_any_write(backend, case):
    error, message, ema, src, decay = _bad_lists("cpu")[case]
    before = snapshot(ema + src)
    with pytest.raises(error, match=message):
        ntkcl_fast.ema_update_(ema, src, decay, backend=backend)
    assert_unchanged(ema + src, before)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_meta_tensors_have_no_false_aliasing(backend):
    ema = [torch.empty(5, device="meta"), torch.empty(3, 2, device="meta", dtype=torch.bfloat16)]
    src = [torch.empty(5, device="meta", dtype=torch.float16), torch.empty(3, 2, device="meta")]
    ntkcl_fast.ema_update_(ema, src, 0.5, backend=backend)
    ntkcl_fast.ema_update_(ema, src, torch.tensor(0.5, device="meta"), backend=backend)
    assert ema[1].shape == (3, 2) and ema[1].device.type == "meta"


def _ops():
    ops = [pytest.param("ntkcl_fast", marks=pytest.mark.skipif(_backend._C is None, reason="extension not built"))]
    reason = _backend.unavailable_reason("triton", "cpu", "ema_update_")
    ops.append(pytest.param(_backend.TRITON_NAMESPACE, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return ops


@pytest.mark.parametrize("namespace", _ops())
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(namespace, grad):
    op = getattr(torch.ops, namespace).ema_update_.default
    for args in ema_op_samples("cpu", grad=grad):
        torch.library.opcheck(op, args)


# CPU tensors only: a CUDA decay tensor is read on device and not range-checked (that would sync)
@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p.values[0] == "cpu"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_compiled_decay_tensor_is_still_range_checked(device, backend, contiguous):
    """The CPU decay-tensor check runs inside the graph (as an op), before anything is written."""
    ema = [torch.randn(3), torch.randn(4, 6) if contiguous else torch.randn(6, 4).t()]
    src = [torch.randn(3), torch.randn(4, 6)]
    fn = compiled(lambda e, s, d: ntkcl_fast.ema_update_(e, s, d, backend=backend))
    fn(ema, src, torch.tensor(0.5))
    before = snapshot(ema)
    with pytest.raises(ValueError, match="decay"):
        fn(ema, src, torch.tensor(1.5))
    assert_unchanged(ema, before)


@pytest.mark.parametrize("grad", [False, True])
def test_value_check_op(grad):
    """The range-check op of tensor arguments: opcheck, the error, and values passed through."""
    op = torch.ops.ntkcl_fast_checks.checked_values.default
    decay = torch.tensor(0.25, dtype=torch.float64, requires_grad=grad)
    rows = torch.rand(7, dtype=torch.float64).add_(0.1).requires_grad_(grad)
    torch.library.opcheck(op, (decay, "unit", "decay"))
    torch.library.opcheck(op, (rows, "positive", "q"))
    assert torch.equal(op(rows, "positive", "q"), rows)
    for bad, rule in ((torch.tensor(1.5), "unit"), (torch.tensor(float("nan")), "unit"),
                      (torch.tensor([1.0, 0.0]), "positive"), (torch.tensor([float("inf")]), "positive")):
        with pytest.raises(ValueError, match="my_arg"):
            op(bad, rule, "my_arg")
