"""l2_penalty, l2_penalty_grad_ and fisher_accumulate_ on every backend against the fp64 reference."""
from __future__ import annotations

import random

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend
from ntkcl_fast.reference import penalty as reference

from ._helpers import assert_within_budget, device_backends, interpreted_triton

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = [(1,), (3,), (1023,), (65537,), (17, 33), (2, 3, 5)]
PAIRS = device_backends("l2_penalty")
FISHER_PAIRS = device_backends("fisher_accumulate_")
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def _inputs(shapes, p_dtypes, a_dtypes, device, seed, with_importance=True):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(shapes, p_dtypes)]
    anchors = [torch.randn(s, generator=gen).to(device, dt) for s, dt in zip(shapes, a_dtypes)]
    importance = ([(torch.rand(s, generator=gen) + 0.05).to(device, dt) for s, dt in zip(shapes, a_dtypes)]
                  if with_importance else None)
    return params, anchors, importance


def _oracle(params, anchors, importance, scale):
    p64 = [p.double() for p in params]
    a64 = [a.double() for a in anchors]
    f64 = [f.double() for f in importance] if importance is not None else None
    return (reference.l2_penalty(p64, a64, f64, scale),
            reference.l2_penalty_grad(p64, a64, f64, scale))


def _eager(params, anchors, importance, lam, half):
    """What users write today (Avalanche / L2-SP): an autograd loop of small ops, grads in param dtype."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    total = 0
    for i, (p, a) in enumerate(zip(leaves, anchors)):
        q = (p - a) ** 2
        if importance is not None:
            q = importance[i] * q
        total = total + q.sum()
    total = lam * (0.5 if half else 1.0) * total
    total.backward()
    return total.detach().float(), [p.grad for p in leaves]


def _check(params, anchors, importance, device, backend, lam=0.7, half=False):
    scale = lam * (0.5 if half else 1.0)
    want_v, want_g = _oracle(params, anchors, importance, scale)
    eager_v, eager_g = _eager(params, anchors, importance, lam, half)
    extra = 1 if interpreted_triton(backend, device) else 0
    leaves = [p.detach().clone().requires_grad_() for p in params]
    value = ntkcl_fast.l2_penalty(leaves, anchors, importance, lam=lam, half=half, backend=backend)
    assert value.dtype == torch.float32 and value.dim() == 0 and value.requires_grad
    assert_within_budget(value.detach(), want_v, eager_v, what="value")
    value.backward()
    for i, (p, w, e) in enumerate(zip(leaves, want_g, eager_g)):
        assert p.grad.dtype == params[i].dtype and p.grad.shape == params[i].shape
        assert_within_budget(p.grad, w, e, extra_ulps=extra, what=f"grad {i} {params[i].dtype}")
    # the no-graph path: same value, same gradient added into fresh grads
    leaves = [p.detach().clone().requires_grad_() for p in params]
    value2 = ntkcl_fast.l2_penalty_grad_(leaves, anchors, importance, lam=lam, half=half, backend=backend)
    assert value2.dtype == torch.float32 and not value2.requires_grad
    assert_within_budget(value2, want_v, eager_v, what="grad_ value")
    for i, (p, w, e) in enumerate(zip(leaves, want_g, eager_g)):
        assert_within_budget(p.grad, w, e, extra_ulps=extra, what=f"grad_ {i} {params[i].dtype}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("p_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("a_dtype", ["same", torch.float32], ids=IDS)
@pytest.mark.parametrize("with_importance", [True, False], ids=["ewc", "l2"])
def test_value_and_grad_match_reference(device, backend, p_dtype, a_dtype, with_importance):
    a_dtype = p_dtype if a_dtype == "same" else a_dtype
    params, anchors, importance = _inputs(SIZES, [p_dtype] * len(SIZES), [a_dtype] * len(SIZES), device, 0,
                                          with_importance)
    _check(params, anchors, importance, device, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("lam,half", [(1.0, False), (1.0, True), (5000.0, True), (-0.25, False)])
def test_lam_and_half(device, backend, lam, half):
    params, anchors, importance = _inputs([(7, 9), (1,)], [torch.bfloat16, torch.float32],
                                          [torch.float32, torch.float32], device, 3)
    _check(params, anchors, importance, device, backend, lam=lam, half=half)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("count", [1, 7, 300])
def test_long_mixed_lists_one_call(device, backend, count):
    rng = random.Random(count)
    shapes, p_dt, a_dt = [], [], []
    for _ in range(count):
        shapes.append(rng.choice([(rng.randint(1, 40),), (rng.randint(1, 9), rng.randint(1, 70)), (0,)]))
        p_dt.append(rng.choice(DTYPES))
        a_dt.append(rng.choice([p_dt[-1], torch.float32]))
    params, anchors, importance = _inputs(shapes, p_dt, a_dt, device, count)
    _check(params, anchors, importance, device, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grad_is_added_into_existing_grads(device, backend):
    params, anchors, importance = _inputs([(1023,), (3,), (5, 7)], [torch.bfloat16, torch.float32, torch.float16],
                                          [torch.float32] * 3, device, 5)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    gen = torch.Generator().manual_seed(6)
    before = [torch.randn(params[0].shape, generator=gen).to(device, params[0].dtype), None,
              torch.randn(params[2].shape, generator=gen).to(device, params[2].dtype)]
    for p, g in zip(leaves, before):
        p.grad = None if g is None else g.clone()
    kept = leaves[0].grad
    value = ntkcl_fast.l2_penalty_grad_(leaves, anchors, importance, lam=0.3, backend=backend)
    assert leaves[0].grad is kept  # written in place, not replaced
    want_v, want_g = _oracle(params, anchors, importance, 0.3)
    _, eager_g = _eager(params, anchors, importance, 0.3, False)
    assert_within_budget(value, want_v, want_v.float(), what="value")
    extra = 1 if interpreted_triton(backend, device) else 0
    for i, (p, b, w, e) in enumerate(zip(leaves, before, want_g, eager_g)):
        base = b.double() if b is not None else 0.0
        eager_sum = (b + e) if b is not None else e
        assert_within_budget(p.grad, base + w, eager_sum, extra_ulps=extra, what=f"grad {i}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_value_is_deterministic(device, backend):
    params, anchors, importance = _inputs([(65537,), (1023,), (40000,)], [torch.bfloat16, torch.float32,
                                          torch.float32], [torch.float32] * 3, device, 7)
    values = [ntkcl_fast.l2_penalty(params, anchors, importance, backend=backend) for _ in range(3)]
    if backend == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            values.append(ntkcl_fast.l2_penalty(params, anchors, importance, backend=backend))
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(v, values[0]) for v in values)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_inputs(device, backend):
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(33, 65, generator=gen).to(device).t(), torch.randn(9, 20, generator=gen).to(device)[:, ::3]]
    anchors = [torch.randn(65, 33, generator=gen).to(device), torch.randn(20, 9, generator=gen).to(device).t()[:, 1::3]]
    importance = [torch.rand(33, 65, generator=gen).to(device).t(), torch.rand(9, 7, generator=gen).to(device)]
    want_v, want_g = _oracle(params, anchors, importance, 1.0)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    value = ntkcl_fast.l2_penalty(leaves, anchors, importance, backend=backend)
    value.backward()
    torch.testing.assert_close(value.double(), want_v, rtol=1e-6, atol=0)
    for p, w in zip(leaves, want_g):
        torch.testing.assert_close(p.grad.double(), w, rtol=1e-6, atol=1e-6)
    # an existing non-contiguous grad is accumulated into through its own strides
    p = params[0].detach().clone()
    grad = torch.zeros(33, 65, device=device).t()
    p.grad = grad
    ntkcl_fast.l2_penalty_grad_([p], anchors[:1], importance[:1], backend=backend)
    assert p.grad is grad
    torch.testing.assert_close(grad.double(), want_g[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_empty_tensors_and_lists(device, backend):
    assert ntkcl_fast.l2_penalty([], [], backend=backend).item() == 0.0
    p = torch.empty(0, 4, device=device, requires_grad=True)
    v = ntkcl_fast.l2_penalty([p], [torch.empty(0, 4, device=device)], backend=backend)
    assert v.item() == 0.0
    v.backward()
    assert p.grad.shape == (0, 4)
    assert ntkcl_fast.l2_penalty_grad_([], [], backend=backend).item() == 0.0
    ntkcl_fast.fisher_accumulate_([], [], backend=backend)


def test_only_params_get_gradients():
    p = torch.randn(5, requires_grad=True)
    a = torch.randn(5, requires_grad=True)
    f = torch.rand(5, requires_grad=True)
    ntkcl_fast.l2_penalty(p, a, f).backward()
    assert p.grad is not None and a.grad is None and f.grad is None


def test_params_not_requiring_grad_get_none():
    p = [torch.randn(5, requires_grad=True), torch.randn(3)]
    v = ntkcl_fast.l2_penalty(p, [torch.zeros(5), torch.zeros(3)])
    v.backward()
    torch.testing.assert_close(p[0].grad, 2 * p[0].detach())
    assert p[1].grad is None


def test_double_backward_path_scales_with_grad_output():
    p = torch.randn(6, requires_grad=True)
    a = torch.randn(6)
    v = ntkcl_fast.l2_penalty(p, a, lam=2.0, half=True)
    (3.0 * v).backward()
    torch.testing.assert_close(p.grad, 3.0 * 2.0 * (p.detach() - a))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_closed_form_backward_matches_autograd_of_reference(device, backend):
    params, anchors, importance = _inputs([(31,), (4, 5)], [torch.float64] * 2, [torch.float64] * 2, device, 10)
    leaves = [p.clone().requires_grad_() for p in params]
    reference.l2_penalty(leaves, anchors, importance, 0.4).backward()
    mine = [p.clone().requires_grad_() for p in params]
    ntkcl_fast.l2_penalty(mine, anchors, importance, lam=0.8, half=True, backend=backend).backward()
    for a, b in zip(leaves, mine):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- fisher_accumulate_

def _fisher_eager(fisher, grads, scale, decay):
    """mammoth / Avalanche style: fisher * decay + scale * g ** 2 in fisher's dtype."""
    return [f * decay + scale * g.to(f.dtype) ** 2 for f, g in zip(fisher, grads)]


@pytest.mark.parametrize("device,backend", FISHER_PAIRS)
@pytest.mark.parametrize("f_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("g_dtype", DTYPES, ids=IDS)
def test_fisher_matches_reference(device, backend, f_dtype, g_dtype):
    gen = torch.Generator().manual_seed(11)
    fisher = [torch.rand(s, generator=gen).to(device, f_dtype) for s in SIZES]
    grads = [torch.randn(s, generator=gen).to(device, g_dtype) for s in SIZES]
    for scale, decay in [(1.0, 1.0), (0.125, 0.9)]:
        want = [f.double() for f in fisher]
        reference.fisher_accumulate_(want, [g.double() for g in grads], scale, decay)
        eager = _fisher_eager(fisher, grads, scale, decay)
        got = [f.clone() for f in fisher]
        ntkcl_fast.fisher_accumulate_(got, grads, scale=scale, decay=decay, backend=backend)
        extra = 1 if interpreted_triton(backend, device) else 0
        for i, (g, w, e) in enumerate(zip(got, want, eager)):
            assert g.dtype == f_dtype
            assert_within_budget(g, w, e, extra_ulps=extra, what=f"fisher {i}")


@pytest.mark.parametrize("device,backend", FISHER_PAIRS)
def test_fisher_long_list_and_strided(device, backend):
    rng = random.Random(12)
    gen = torch.Generator().manual_seed(12)
    shapes = [rng.choice([(rng.randint(1, 40),), (rng.randint(1, 9), rng.randint(1, 70)), (0,)]) for _ in range(300)]
    fisher = [torch.rand(s, generator=gen).to(device) for s in shapes] + [torch.rand(9, 20).to(device)[:, ::3]]
    grads = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in shapes] + [torch.randn(7, 9).to(device).t()]
    want = [f.double() for f in fisher]
    reference.fisher_accumulate_(want, [g.double() for g in grads], 0.5, 0.25)
    ntkcl_fast.fisher_accumulate_(fisher, grads, scale=0.5, decay=0.25, backend=backend)
    for f, w in zip(fisher, want):
        torch.testing.assert_close(f.double(), w, rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------- backends, kernels

def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ntkcl_fast.l2_penalty(torch.zeros(3), torch.ones(3), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ntkcl_fast.fisher_accumulate_(torch.zeros(3), torch.ones(3), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match=r"anchors\[0\]"):
        ntkcl_fast.l2_penalty([torch.zeros(3, device="cuda")], [torch.ones(3)])


def _kernel_devices():
    out = []
    if _backend._C is not None:
        out.append("cpu")
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(not ntkcl_fast.backends()["cuda"],
                                                              reason="needs the CUDA kernels and a GPU")))
    return out


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
@pytest.mark.parametrize("device", _kernel_devices())
def test_grad_op_overwrites_poisoned_grads(device):
    params, anchors, importance = _inputs([(65537,), (3,), (1023,)], [torch.bfloat16, torch.float32, torch.float64],
                                          [torch.float32] * 3, device, 13)
    grads = [torch.full_like(p, float("nan")) for p in params]
    go = torch.tensor(0.5, device=device)
    value = torch.ops.ntkcl_fast.l2_penalty_grad_(grads, params, anchors, importance, 0.75, go, False)
    want_v, want_g = _oracle(params, anchors, importance, 0.75)
    torch.testing.assert_close(value.double(), want_v, rtol=1e-6, atol=0)
    for g, w in zip(grads, want_g):
        assert not g.isnan().any()
        torch.testing.assert_close(g.double(), 0.5 * w, rtol=1e-2 if g.dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
@pytest.mark.parametrize("device", _kernel_devices())
def test_kernels_check_their_arguments(device):
    ops = torch.ops.ntkcl_fast
    a, b = torch.randn(3, device=device), torch.randn(4, device=device)
    with pytest.raises(ValueError, match="anchors"):
        ops.l2_penalty([a], [b], [], 1.0)
    with pytest.raises(ValueError, match="grads"):
        ops.l2_penalty_grad_([b], [a], [a], [], 1.0, None, True)
    with pytest.raises(ValueError, match="grads"):
        ops.fisher_accumulate_([a], [b], 1.0, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ops.l2_penalty([torch.randn(3, 4, device=device).t()], [torch.randn(4, 3, device=device)], [], 1.0)


def test_reference_is_the_formula():
    p, a, f = (torch.tensor([3.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
               torch.tensor([0.5], dtype=torch.float64))
    assert reference.l2_penalty([p], [a], [f], 0.5).item() == 0.5 * 0.5 * 4.0
    assert reference.l2_penalty_grad([p], [a], [f], 0.5)[0].item() == 2 * 0.5 * 0.5 * 2.0
    fi = torch.tensor([2.0], dtype=torch.float64)
    reference.fisher_accumulate_([fi], [torch.tensor([3.0], dtype=torch.float64)], 0.5, 0.25)
    assert fi.item() == 0.25 * 2.0 + 0.5 * 9.0


def test_triton_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile the kernels to PTX too."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).resolve().parent.parent / "scripts" / "compile_triton_penalty.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not ntkcl_fast.backends()["cuda"], reason="needs the CUDA kernels and a GPU")
def test_cuda_graph_capture_of_penalty_and_gradient():
    params = [torch.randn(1000, device="cuda", dtype=torch.bfloat16).requires_grad_(), torch.randn(7, device="cuda")
              .requires_grad_()]
    anchors = [torch.zeros(1000, device="cuda"), torch.zeros(7, device="cuda")]
    for p in params:
        p.grad = torch.zeros_like(p)
    ntkcl_fast.l2_penalty_grad_(params, anchors, backend="cuda")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value = ntkcl_fast.l2_penalty_grad_(params, anchors, backend="cuda")
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    want = sum((p.detach().double() ** 2).sum() for p in params)
    torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=0)
    for p in params:
        torch.testing.assert_close(p.grad, 2 * p.detach())
