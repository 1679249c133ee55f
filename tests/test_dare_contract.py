"""The op contract of the DARE family: torch.compile(fullgraph=True) equals eager, version counters
and autograd's in-place check, nothing written before an error, opcheck of every op."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend

from ._helpers import assert_bumps_versions, assert_unchanged, compiled, device_backends, snapshot
from ._samples_ema_dare import dare_multi_op_samples, dare_op_samples, dare_samples, prune_samples

PAIRS = device_backends("dare_")
PRUNE_PAIRS = [p for p in device_backends("magnitude_prune_") if "triton" not in p.id]
DARE = [s[0] for s in dare_samples("cpu")]
PRUNE = [s[0] for s in prune_samples("cpu")]


def _sample(device, name):
    _, f, b, kw = next(s for s in dare_samples(device) if s[0] == name)
    return f, b, kw


def _assert_same(got, want):
    """Same backend compiled and eager: bit for bit (NaN-aware); the mask is integer math everywhere."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.contiguous().view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("sample", DARE)
def test_dare_and_dare_delta_compiled_equal_eager(device, backend, sample):
    f, b, kw = _sample(device, sample)
    _assert_same(compiled(lambda f, b: ntkcl_fast.dare(f, b, **kw, backend=backend))(f, b),
                 ntkcl_fast.dare(f, b, **kw, backend=backend))
    out = torch.full_like(f, float("nan"))
    compiled(lambda f, b, o: ntkcl_fast.dare(f, b, **kw, out=o, backend=backend))(f, b, out)
    _assert_same(out, ntkcl_fast.dare(f, b, **kw, backend=backend))
    d, want = f - b, f - b
    compiled(lambda d: ntkcl_fast.dare_delta_(d, **kw, backend=backend))(d)
    _assert_same(d, ntkcl_fast.dare_delta_(want, **kw, backend=backend))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_dare_mask_compiled_equals_eager(device, backend):
    for shape, p in (((1023,), 0.4), ((7, 13), 0.9), ((3,), 0.0)):
        fn = compiled(lambda: ntkcl_fast.dare_mask(shape, p, seed=3, key=4, device=device, backend=backend))
        assert torch.equal(fn(), ntkcl_fast.dare_mask(shape, p, seed=3, key=4, device=device, backend=backend))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_dare_state_dict_compiled_equals_eager(device, backend):
    fin = {name: f for name, f, _, _ in dare_samples(device)}
    base = {name: b for name, _, b, _ in dare_samples(device)}
    fin["step"], base["step"] = torch.tensor(3, device=device), torch.tensor(1, device=device)
    q = {"scalar-q": 0.45, "row-q": dare_samples(device)[2][3]["q"]}
    kw = dict(q=q, seed=7, exclude=[r"^keep-all$"], backend=backend)
    got = compiled(lambda f, b: ntkcl_fast.dare_state_dict(f, b, 0.6, **kw))(fin, base)
    want = ntkcl_fast.dare_state_dict(fin, base, 0.6, **kw)
    assert list(got) == list(want)
    for name in want:
        _assert_same(got[name], want[name])


@pytest.mark.parametrize("device,backend", PRUNE_PAIRS)
@pytest.mark.parametrize("sample", PRUNE)
def test_magnitude_prune_compiled_equals_eager(device, backend, sample):
    _, delta, density = next(s for s in prune_samples(device) if s[0] == sample)
    want = ntkcl_fast.magnitude_prune_(delta.clone(), density, backend=backend)
    compiled(lambda d: ntkcl_fast.magnitude_prune_(d, density, backend=backend))(delta)
    _assert_same(delta, want)


def _in_place_calls(device, backend, contiguous):
    """(name, tensor the op writes, call) for every in-place DARE op."""
    def target(*shape):
        return torch.randn(*shape, device=device) if contiguous else torch.randn(*reversed(shape), device=device).t()
    f = torch.randn(9, 5, device=device)
    calls = []
    out, delta = target(9, 5), target(9, 5)
    calls.append(("dare(out=)", out, lambda: ntkcl_fast.dare(f, f * 2, 0.5, out=out, backend=backend)))
    calls.append(("dare_delta_", delta, lambda: ntkcl_fast.dare_delta_(delta, 0.5, backend=backend)))
    if backend != "triton":
        pruned = target(9, 5)
        calls.append(("magnitude_prune_", pruned, lambda: ntkcl_fast.magnitude_prune_(pruned, 0.5, backend=backend)))
    return calls


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("contiguous", [True, False])
def test_in_place_ops_bump_versions_and_autograd_sees_it(device, backend, contiguous):
    for name, written, call in _in_place_calls(device, backend, contiguous):
        w = torch.randn(9, 5, device=device, requires_grad=True)
        loss = (w * written).sum()  # saves `written` for backward
        assert_bumps_versions(call, [written])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def _bad_calls(device):
    """(error, message, written tensors, call): each must raise before writing anything."""
    f, b = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    nan_rows = torch.tensor([1.0, float("nan"), 1.0, 1.0], device=device)
    inf_rows = torch.tensor([1.0, 1.0, float("inf"), 1.0], device=device)
    wide = torch.randn(1, 5, device=device).expand(4, 5)
    return [
        (ValueError, "q", [f, b], lambda bk: ntkcl_fast.dare(f, b, 0.5, q=nan_rows, out=f, backend=bk)),
        (ValueError, "q", [f, b], lambda bk: ntkcl_fast.dare(f, b, 0.5, q=inf_rows, out=b, backend=bk)),
        (ValueError, "q", [f], lambda bk: ntkcl_fast.dare_delta_(f, 0.5, q=-nan_rows.abs(), backend=bk)),
        (ValueError, "out.*stride-0", [f, b, wide], lambda bk: ntkcl_fast.dare(f, b, 0.5, out=wide, backend=bk)),
        (ValueError, "delta.*stride-0", [wide], lambda bk: ntkcl_fast.dare_delta_(wide, 0.5, backend=bk)),
        (ValueError, "delta.*stride-0", [wide], lambda bk: ntkcl_fast.magnitude_prune_(wide, 0.5, backend=bk)),
        (ValueError, "density", [f], lambda bk: ntkcl_fast.magnitude_prune_(f, 1.5, backend=bk)),
    ]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))))
def test_bad_input_raises_before_any_write(device, backend, case):
    error, message, written, call = _bad_calls(device)[case]
    before = snapshot(written)
    with pytest.raises(error, match=message):
        call(backend)
    assert_unchanged(written, before)


def _ops(name):
    ops = [pytest.param("ntkcl_fast", marks=pytest.mark.skipif(_backend._C is None, reason="extension not built"))]
    if name != "magnitude_prune_":
        reason = _backend.unavailable_reason("triton", "cpu", name)
        ops.append(pytest.param(_backend.TRITON_NAMESPACE,
                                marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return ops


@pytest.mark.parametrize("namespace", _ops("dare_"))
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_dare_(namespace, grad):
    for args in dare_op_samples("cpu", grad=grad):
        torch.library.opcheck(getattr(torch.ops, namespace).dare_.default, args)


@pytest.mark.parametrize("namespace", _ops("dare_multi_"))
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_dare_multi_(namespace, grad):
    for args in dare_multi_op_samples("cpu", grad=grad):
        torch.library.opcheck(getattr(torch.ops, namespace).dare_multi_.default, args)


@pytest.mark.parametrize("namespace", _ops("magnitude_prune_"))
def test_opcheck_magnitude_prune_(namespace):
    for _, delta, density in prune_samples("cpu"):
        torch.library.opcheck(getattr(torch.ops, namespace).magnitude_prune_.default,
                              (delta.contiguous(), round(density * delta.numel())))



@pytest.mark.skipif(_backend._triton_import_error() is not None, reason="triton is not installed")
def test_ema_and_dare_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter does not type-check kernels: compile every EMA / DARE variant to PTX."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "compile_triton_ema_dare.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("device,backend", PAIRS)
def test_compiled_per_row_q_is_still_checked(device, backend):
    """The per-row q check runs inside the graph (as an op), before anything is written."""
    f, b = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    fn = compiled(lambda f, b, q: ntkcl_fast.dare(f, b, 0.5, q=q, out=f, backend=backend))
    fn(f, b, torch.ones(4, device=device))
    before = snapshot([f, b])
    with pytest.raises(ValueError, match="q"):
        fn(f, b, torch.tensor([1.0, float("nan"), 1.0, 1.0], device=device))
    assert_unchanged([f, b], before)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("buffers", [False, True])
def test_dare_state_dict_of_modules_merges_parameters(device, backend, buffers):
    """Modules stand for their state dicts; buffers (BatchNorm statistics) come from the finetuned
    module unless `buffers=True` merges the floating ones."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7)).to(device)
    fin = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7)).to(device)
    with torch.no_grad():
        fin[1].running_mean.normal_()
        fin[1].num_batches_tracked.fill_(4)
    got = ntkcl_fast.dare_state_dict(fin, base, 0.5, seed=3, buffers=buffers, backend=backend)
    fin_sd, base_sd = fin.state_dict(), base.state_dict()
    assert list(got) == list(fin_sd)
    merged = {n for n, _ in fin.named_parameters()} | ({"1.running_mean", "1.running_var"} if buffers else set())
    for name, value in got.items():
        if name in merged:
            want = ntkcl_fast.dare(fin_sd[name], base_sd[name], 0.5, seed=3, key=ntkcl_fast.tensor_key(name),
                                   backend=backend)
            assert torch.equal(value, want), name
        else:
            assert torch.equal(value, fin_sd[name]), name
    assert torch.equal(got["1.num_batches_tracked"], torch.tensor(4, device=device))
