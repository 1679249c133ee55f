"""The op contract of l2_penalty, l2_penalty_grad_ and fisher_accumulate_: opcheck of every
registered op, torch.compile(fullgraph=True) equal to eager, version counters, and no write
before an error, on every backend."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend

from ._helpers import (assert_bumps_versions, assert_unchanged, assert_within_budget, compiled, device_backends,
                       snapshot)
from ._penalty_samples import fisher_samples, l2_grad_samples, l2_samples

PAIRS = device_backends("l2_penalty")


def _namespaces():
    out = [pytest.param("ntkcl_fast", marks=pytest.mark.skipif(_backend._C is None, reason="extension not built"))]
    reason = _backend.unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu", "l2_penalty")
    out.append(pytest.param(_backend.TRITON_NAMESPACE, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def _op_device(namespace: str) -> str:
    return "cuda" if namespace == "ntkcl_fast" and ntkcl_fast.backends()["cuda"] or (
        namespace != "ntkcl_fast" and torch.cuda.is_available()) else "cpu"


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("namespace", _namespaces())
def test_opcheck(namespace):
    ops = getattr(torch.ops, namespace)
    device = _op_device(namespace)
    for params, anchors, importance, scale in l2_samples(device, requires_grad=True):
        torch.library.opcheck(ops.l2_penalty.default, (params, anchors, importance, scale))
    for args in l2_grad_samples(device):
        torch.library.opcheck(ops.l2_penalty_grad_.default, args)
    for args in fisher_samples(device):
        torch.library.opcheck(ops.fisher_accumulate_.default, args)


@pytest.mark.parametrize("namespace", _namespaces())
def test_registered_backward_is_the_closed_form_in_fp64(namespace):
    """The autograd formula registered on each op equals autograd through the reference."""
    from ntkcl_fast.reference import penalty as reference
    device = _op_device(namespace)
    params, anchors, importance, scale = l2_samples(device, requires_grad=True)[2]  # the fp64 sample
    mine = [p.detach().clone().requires_grad_() for p in params]
    go = torch.tensor(1.75, device=device)
    getattr(torch.ops, namespace).l2_penalty(mine, anchors, importance, scale).backward(go.float())
    reference.l2_penalty(params, anchors, importance, scale).backward(go.double())
    for a, b in zip(mine, params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_on_reference():
    from ntkcl_fast.reference import penalty as reference
    params, anchors, importance, scale = l2_samples("cpu", requires_grad=True)[2]
    params = [p[:7] if p.dim() == 1 else p for p in params]
    params = [p.detach()[..., :4].clone().requires_grad_() for p in params]
    anchors = [torch.randn_like(p) for p in params]
    importance = [torch.rand_like(p) for p in params]
    assert torch.autograd.gradcheck(lambda *p: reference.l2_penalty(list(p), anchors, importance, scale), params)
    assert torch.autograd.gradgradcheck(lambda *p: reference.l2_penalty(list(p), anchors, importance, scale), params)


# ---------------------------------------------------------------- torch.compile(fullgraph=True)
def _assert_same(a, b, backend):
    # the torch backend is the reference, which inductor fuses and may round differently
    if backend == "torch":
        torch.testing.assert_close(a, b)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_l2_penalty_compiles_to_eager(device, backend):
    for params, anchors, importance, scale in l2_samples(device, requires_grad=True)[:2]:
        def loss(ps):
            return ntkcl_fast.l2_penalty(ps, anchors, importance or None, lam=scale, backend=backend)
        results = []
        for fn in (loss, compiled(loss)):
            leaves = [p.detach().clone().requires_grad_() for p in params]
            value = fn(leaves)
            (3.0 * value).backward()
            results.append((value.detach(), [p.grad for p in leaves]))
        (v_eager, g_eager), (v_comp, g_comp) = results
        _assert_same(v_comp, v_eager, backend)
        for a, b in zip(g_comp, g_eager):
            _assert_same(a, b, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_l2_penalty_grad_compiles_to_eager(device, backend):
    params, anchors, importance, scale = l2_samples(device)[0]

    def step(ps):
        return ntkcl_fast.l2_penalty_grad_(ps, anchors, importance, lam=scale, half=True, backend=backend)
    results = []
    for fn in (step, compiled(step)):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        leaves[1].grad = torch.ones_like(leaves[1])  # one held gradient, the others fresh
        values = [fn(leaves), fn(leaves)]
        results.append((values, [p.grad for p in leaves]))
    for a, b in zip(results[1][0] + results[1][1], results[0][0] + results[0][1]):
        _assert_same(a, b, backend)


@pytest.mark.parametrize("device,backend", device_backends("fisher_accumulate_"))
def test_fisher_accumulate_compiles_to_eager(device, backend):
    fisher, grads, scale, decay = fisher_samples(device)[0]
    eager = [f.clone() for f in fisher]
    mine = [f.clone() for f in fisher]
    ntkcl_fast.fisher_accumulate_(eager, grads, scale=scale, decay=decay, backend=backend)
    compiled(lambda: ntkcl_fast.fisher_accumulate_(mine, grads, scale=scale, decay=decay, backend=backend))()
    for a, b in zip(mine, eager):
        _assert_same(a, b, backend)


# ---------------------------------------------------------------- version counters
def _saved_for_backward(t):
    """A graph that saved `t`: its backward raises once `t` was written in place."""
    w = torch.randn(t.shape, device=t.device, dtype=t.dtype, requires_grad=True)
    return (w * t).sum()


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_in_place_writes_are_seen_by_autograd(device, backend, layout):
    def tensor(*shape):
        t = torch.randn(*shape[::-1], device=device)
        return t.t() if layout == "strided" else t.reshape(shape)
    params = [tensor(5, 3).requires_grad_(), tensor(7, 2).requires_grad_()]
    anchors = [torch.randn(5, 3, device=device), torch.randn(7, 2, device=device)]
    for p in params:
        p.grad = tensor(*p.shape)
    graph = _saved_for_backward(params[1].grad)
    assert_bumps_versions(lambda: ntkcl_fast.l2_penalty_grad_(params, anchors, backend=backend),
                          [p.grad for p in params])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()
    fisher = [tensor(5, 3), tensor(7, 2)]
    graph = _saved_for_backward(fisher[0])
    assert_bumps_versions(lambda: ntkcl_fast.fisher_accumulate_(fisher, anchors, backend=backend), fisher)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()


# ---------------------------------------------------------------- gradients added like autograd
@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("held", [False, True], ids=["grad-none", "grad-held"])
def test_a_param_listed_twice_gets_its_gradient_twice(device, backend, held):
    p = torch.randn(9, device=device, requires_grad=True)
    q = torch.randn(4, device=device, requires_grad=True)
    a = [torch.randn(9, device=device), torch.randn(4, device=device), torch.randn(9, device=device)]
    start = torch.randn(9, device=device) if held else None
    p.grad = None if start is None else start.clone()
    value = ntkcl_fast.l2_penalty_grad_([p, q, p], a, lam=0.5, backend=backend)
    # what autograd does with the same list
    twin = p.detach().clone().requires_grad_()
    twin.grad = None if start is None else start.clone()
    want = ntkcl_fast.l2_penalty([twin, q.detach(), twin], a, lam=0.5, backend="torch")
    want.backward()
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(p.grad, twin.grad)
    torch.testing.assert_close(q.grad, (q - a[1]).detach())


# ---------------------------------------------------------------- no write before an error
def _expanded(device):
    return torch.randn(1, device=device).expand(6)


def _bad_grad_calls(device):
    """(error, message, params, anchors, importance, kwargs); params[i].grad set where given."""
    def leaf(n, grad=None):
        p = torch.randn(n, device=device, requires_grad=True)
        p.grad = grad
        return p
    many = [leaf(3, torch.randn(3, device=device)) for _ in range(152)]
    anchors_many = [torch.randn(3, device=device) for _ in range(151)] + [many[151].grad.view(3)]
    return [
        (ValueError, r"params\[1\]\.grad has a stride-0",
         [leaf(6, torch.randn(6, device=device)), leaf(6, _expanded(device))], [torch.randn(6, device=device)] * 2,
         None, {}),
        (ValueError, r"anchors\[151\] shares memory with params\[151\]\.grad", many, anchors_many, None, {}),
        (TypeError, r"params\[1\]\.grad is torch\.sparse_coo",
         [leaf(4), leaf(4, torch.zeros(4, device=device).to_sparse())], [torch.randn(4, device=device)] * 2, None, {}),
        (ValueError, r"anchors\[1\]", [leaf(3, torch.randn(3, device=device)), leaf(4)],
         [torch.randn(3, device=device), torch.randn(5, device=device)], None, {}),
        (TypeError, r"importance\[1\]", [leaf(3), leaf(3)], [torch.randn(3, device=device)] * 2,
         [torch.rand(3, device=device), torch.ones(3, dtype=torch.int32, device=device)], {}),
    ]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("case", range(5))
def test_bad_grad_input_raises_before_writing(device, backend, case):
    error, message, params, anchors, importance, kw = _bad_grad_calls(device)[case]
    tensors = params + anchors + (importance or [])
    before = snapshot([t for t in tensors if t.layout == torch.strided and not _is_sparse_grad(t)])
    versions = [p.grad._version for p in params if p.grad is not None]
    with pytest.raises(error, match=message):
        ntkcl_fast.l2_penalty_grad_(params, anchors, importance, backend=backend, **kw)
    assert_unchanged([t for t in tensors if t.layout == torch.strided and not _is_sparse_grad(t)], before)
    assert versions == [p.grad._version for p in params if p.grad is not None]


def _is_sparse_grad(t):
    return t.grad is not None and t.grad.layout != torch.strided


def _bad_penalty_calls(device):
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)
    return [
        (ValueError, "anchors", lambda: ([t(3), t(3)], [t(3)], None, {})),
        (ValueError, r"anchors\[1\]", lambda: ([t(3), t(4)], [t(3), t(5)], None, {})),
        (ValueError, r"importance\[0\]", lambda: ([t(3)], [t(3)], [t(4)], {})),
        (ValueError, "importance", lambda: ([t(3)], [t(3)], [t(3), t(3)], {})),
        (TypeError, r"params\[0\]", lambda: ([t(3).long()], [t(3)], None, {})),
        (TypeError, r"anchors\[1\]", lambda: ([t(3), t(3)], [t(3), t(3, dtype=torch.complex64)], None, {})),
        (TypeError, r"importance\[0\]", lambda: ([t(3)], [t(3)], [t(3).int()], {})),
        (TypeError, r"anchors\[1\]", lambda: ([t(3), t(3)], [t(3), "x"], None, {})),
        (TypeError, "params", lambda: (3.0, [t(3)], None, {})),
        (ValueError, "lam", lambda: ([t(3)], [t(3)], None, {"lam": float("nan")})),
        (TypeError, "lam", lambda: ([t(3)], [t(3)], None, {"lam": "1"})),
        (TypeError, "half", lambda: ([t(3)], [t(3)], None, {"half": 1})),
        (ValueError, "backend", lambda: ([t(3)], [t(3)], None, {"backend": "fast"})),
    ]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("case", range(len(_bad_penalty_calls("cpu"))))
def test_bad_penalty_input_raises_before_writing(device, backend, case):
    error, names, make = _bad_penalty_calls(device)[case]
    params, anchors, importance, kw = make()
    kw = {"backend": backend, **kw}
    if isinstance(params, list):
        params = [p.detach().requires_grad_() if p.is_floating_point() else p for p in params]
    tensors = [t for t in (params if isinstance(params, list) else []) + anchors + (importance or [])
               if isinstance(t, torch.Tensor)]
    before = snapshot(tensors)
    with pytest.raises(error, match=names):
        ntkcl_fast.l2_penalty(params, anchors, importance, **kw)
    with pytest.raises(error, match=names):
        ntkcl_fast.l2_penalty_grad_(params, anchors, importance, **kw)
    assert_unchanged(tensors, before)  # no .grad was created either


def _bad_fisher_calls(device):
    def t(*shape, dtype=torch.float32):
        return torch.rand(*shape, device=device).to(dtype)
    shared = t(8)
    return [
        (ValueError, "grads", lambda: ([t(3), t(3)], [t(3)], {})),
        (ValueError, r"grads\[1\]", lambda: ([t(3), t(4)], [t(3), t(5)], {})),
        (TypeError, r"fisher\[0\]", lambda: ([t(3).long()], [t(3)], {})),
        (TypeError, r"grads\[0\]", lambda: ([t(3)], [t(3).long()], {})),
        (ValueError, "scale", lambda: ([t(3)], [t(3)], {"scale": float("inf")})),
        (TypeError, "decay", lambda: ([t(3)], [t(3)], {"decay": None})),
        (ValueError, r"grads\[0\]", lambda: ([shared], [shared], {})),
        (ValueError, r"fisher\[1\]", lambda: ([shared[:5], shared[4:]], [t(5), t(4)], {})),
        (ValueError, r"fisher\[1\] has a stride-0", lambda: ([t(6), _expanded(device)], [t(6), t(6)], {})),
        (ValueError, "backend", lambda: ([t(3)], [t(3)], {"backend": "fast"})),
    ]


@pytest.mark.parametrize("device,backend", device_backends("fisher_accumulate_"))
@pytest.mark.parametrize("case", range(len(_bad_fisher_calls("cpu"))))
def test_bad_fisher_input_raises_before_writing(device, backend, case):
    error, names, make = _bad_fisher_calls(device)[case]
    fisher, grads, kw = make()
    before = snapshot(fisher + grads)
    with pytest.raises(error, match=names):
        ntkcl_fast.fisher_accumulate_(fisher, grads, **{"backend": backend, **kw})
    assert_unchanged(fisher + grads, before)


# ---------------------------------------------------------------- the op samples against the reference
@pytest.mark.parametrize("namespace", _namespaces())
def test_grad_op_samples_match_reference(namespace):
    """Overwrite samples start NaN-poisoned, so an element the op does not write shows."""
    from ntkcl_fast.reference import penalty as reference
    device = _op_device(namespace)
    extra = 1 if namespace != "ntkcl_fast" and device == "cpu" else 0  # the interpreter truncates to bf16
    for grads, params, anchors, importance, scale, go, accumulate in l2_grad_samples(device):
        before = [g.clone() for g in grads]
        value = getattr(torch.ops, namespace).l2_penalty_grad_(grads, params, anchors, importance, scale, go,
                                                               accumulate)
        f = importance or [None] * len(params)
        c = 2 * scale * (1.0 if go is None else go.item())
        want_v = reference.l2_penalty([p.double() for p in params], [a.double() for a in anchors],
                                      [x.double() for x in importance] or None, scale)
        torch.testing.assert_close(value.double(), want_v, rtol=1e-6, atol=1e-6)
        for i, (g, b, p, a, fi) in enumerate(zip(grads, before, params, anchors, f)):
            d64 = p.double() - a.double()
            want = c * (d64 if fi is None else fi.double() * d64) + (b.double() if accumulate else 0)
            d = p - a.to(p.dtype)  # eager PyTorch in the param's dtype
            eager = c * (d if fi is None else fi.to(p.dtype) * d) + (b if accumulate else 0)
            assert not g.isnan().any(), f"grads[{i}] has unwritten (NaN) elements"
            assert_within_budget(g, want, eager, extra_ulps=extra, what=f"grads[{i}] {p.dtype}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_nan_propagates(device, backend):
    p = torch.randn(1023, device=device, requires_grad=True)
    a = torch.randn(1023, device=device)
    with torch.no_grad():
        p[17] = float("nan")
    value = ntkcl_fast.l2_penalty([p], [a], backend=backend)
    assert value.isnan()
    value.backward()
    assert p.grad[17].isnan() and p.grad.isnan().sum() == 1
    p.grad = None
    assert ntkcl_fast.l2_penalty_grad_([p], [a], backend=backend).isnan()
    assert p.grad[17].isnan() and p.grad.isnan().sum() == 1
    fisher = torch.rand(1023, device=device)
    g = torch.randn(1023, device=device)
    g[5] = float("nan")
    ntkcl_fast.fisher_accumulate_(fisher, g, backend=backend)
    assert fisher[5].isnan() and fisher.isnan().sum() == 1


# ---------------------------------------------------------------- the CPU gradient written in the forward
def _kernel_grads(params, anchors, importance, scale, grad_output=None):
    grads = [torch.empty_like(p) for p in params]
    value = torch.ops.ntkcl_fast.l2_penalty_grad_(grads, [p.detach() for p in params], anchors, importance, scale,
                                                  grad_output, False)
    return value, grads


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
@pytest.mark.parametrize("grad_output", [None, 1.75], ids=["as-is", "scaled"])
def test_cpu_backward_is_the_grad_kernel_bit_for_bit(grad_output):
    """On CPU the forward of a graph-building call writes the gradient (one pass); the backward
    hands it on for an incoming 1 and recomputes for any other: the bits are the kernel's both
    ways, and the value is the value op's."""
    for params, anchors, importance, scale in l2_samples("cpu", requires_grad=True):
        go = None if grad_output is None else torch.tensor(grad_output)
        want_value, want = _kernel_grads(params, anchors, importance, scale, go)
        with torch.no_grad():
            no_graph = torch.ops.ntkcl_fast.l2_penalty(params, anchors, importance, scale)
        value = torch.ops.ntkcl_fast.l2_penalty(params, anchors, importance, scale)
        assert torch.equal(value.detach(), no_graph) and torch.equal(value.detach(), want_value)
        got = torch.autograd.grad(value, params, go)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
def test_cpu_backward_twice_with_retained_graph_adds_twice():
    params, anchors, importance, scale = l2_samples("cpu", requires_grad=True)[0]
    _, want = _kernel_grads(params, anchors, importance, scale)
    value = torch.ops.ntkcl_fast.l2_penalty(params, anchors, importance, scale)
    value.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    value.backward()
    for p, f, w in zip(params, first, want):
        assert torch.equal(f, w)
        assert torch.equal(p.grad, w + w)


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
def test_cpu_backward_after_params_changed_in_place_raises():
    params, anchors, importance, scale = l2_samples("cpu", requires_grad=True)[0]
    value = torch.ops.ntkcl_fast.l2_penalty(params, anchors, importance, scale)
    with torch.no_grad():
        params[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


@pytest.mark.skipif(_backend._C is None, reason="extension not built")
def test_cpu_backward_uses_the_gradient_of_the_forward():
    """The backward does not read the params again: a change through `.data` (which autograd
    does not see) after the forward leaves the gradient of the forward's values."""
    params, anchors, importance, scale = l2_samples("cpu", requires_grad=True)[0]
    _, want = _kernel_grads(params, anchors, importance, scale)
    value = torch.ops.ntkcl_fast.l2_penalty(params, anchors, importance, scale)
    for p in params:
        p.data.add_(1.0)
    value.backward()
    for p, w in zip(params, want):
        assert torch.equal(p.grad, w)
