"""The op contract of the orthogonality family: every forward and backward op of both namespaces
passes opcheck with inputs that require grad, and every public function and Module gives the
eager value and gradients under torch.compile(fullgraph=True) on every backend."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend
from ntkcl_fast.ortho import _ops

from ._helpers import compiled


def _namespaces(device: str) -> list:
    """(namespace, backend) pairs; those this machine cannot run are skipped, never passed."""
    out = []
    for namespace, backend in (("ntkcl_fast", device), (_backend.TRITON_NAMESPACE, "triton")):
        reason = ("no CUDA device" if device == "cuda" and not torch.cuda.is_available()
                  else _backend.unavailable_reason(backend, device, "feature_orthogonality"))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(device, namespace, id=f"{device}-{namespace}", marks=marks))
    return out


NAMESPACES = _namespaces("cpu") + _namespaces("cuda")


def _sample_inputs(device: str, ops):
    """(op name, args) for every forward op and for its backward op, fed with the forward's outputs.
    Odd sizes, mixed dtypes in the lists; every floating input requires grad."""
    gen = torch.Generator().manual_seed(21)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    def kept(outputs):  # the forward's extra outputs, as autograd hands them to the backward
        return [t.detach() for t in outputs[1:]]

    go = torch.tensor(0.7, device=device, requires_grad=True)
    f, p, u = r(5, 8), r(3, 8), r(8, 2)
    labels = torch.tensor([0, 1, 0, 1, 2], device=device)
    ws = [r(3, 8), r(4, 6, dtype=torch.bfloat16)]
    old, new = [r(2, 8), r(3, 6)], [r(4, 8), r(1, 6, dtype=torch.bfloat16)]
    cases = []
    for normalize, mean in ((True, True), (False, False)):
        args = (f, p.to(torch.bfloat16) if mean else p, normalize, mean)
        cases.append(("feature_orthogonality", args))
        s, f_norm, p_norm = kept(ops.feature_orthogonality(*args))
        for need in ((True, True), (True, False), (False, True)):
            cases.append(("feature_orthogonality_backward", (go, s, f_norm, p_norm, *args, *need)))
    for normalize, sumsq in ((True, False), (False, True)):
        cases.append(("projection_residual", (f, u, normalize, sumsq)))
        for need in ((True, True), (False, True)):
            cases.append(("projection_residual_backward", (go, f, u, normalize, sumsq, *need)))
    for mean in (True, False):
        cases.append(("gram_orthogonality", (ws, mean)))
        cases.append(("gram_orthogonality_backward", (go, *kept(ops.gram_orthogonality(ws, mean)), ws)))
    for l1 in (True, False):
        cases.append(("cross_orthogonality", (old, new, l1)))
        (d_products,) = kept(ops.cross_orthogonality(old, new, l1))
        for need in ((True, True), (False, True)):
            cases.append(("cross_orthogonality_backward", (go, d_products, old, new, *need)))
    for y in (labels, torch.arange(5, device=device)):  # the second has no positive pair
        cases.append(("ntkcl_contrastive", (f, y, 0.1)))
        cases.append(("ntkcl_contrastive_backward", (go, *kept(ops.ntkcl_contrastive(f, y, 0.1)), f, y, 0.1)))
    return cases


@pytest.mark.parametrize("device,namespace", NAMESPACES)
def test_opcheck_every_op(device, namespace):
    ops = getattr(torch.ops, namespace)
    cases = _sample_inputs(device, ops)
    assert {name for name, _ in cases} == set(_ops.OPS)
    for name, args in cases:
        torch.library.opcheck(getattr(ops, name), args)


@pytest.mark.parametrize("device,namespace", NAMESPACES)
def test_backward_ops_are_not_differentiable_again(device, namespace):
    """A backward op's outputs carry no graph, so create_graph=True cannot silently give wrong
    second derivatives: they are simply not there."""
    ops = getattr(torch.ops, namespace)
    f = torch.randn(4, 6, device=device, requires_grad=True)
    value = ops.feature_orthogonality(f, torch.randn(3, 6, device=device), True, True)[0]
    (grad,) = torch.autograd.grad(value, f, create_graph=True)
    assert not grad.requires_grad


# ----------------------------------------------------------------------------- torch.compile

def _backends() -> list:
    out = []
    for backend in ("torch", "cpu", "triton"):
        reason = _backend.unavailable_reason(backend, "cpu", "feature_orthogonality")
        out.append(pytest.param(backend, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def _calls(backend: str):
    """(name, fn(*tensors), tensors): every public function and Module, forward and backward."""
    gen = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    kw = {"backend": backend}
    f, p = r(7, 12), r(5, 12)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    u = ntkcl_fast.prototype_basis(r(4, 12), 3)
    ws = [r(3, 12), r(5, 9)]
    old, new = [r(4, 12), r(2, 9)], [r(3, 12), r(1, 9)]
    return [
        ("feature_orthogonality", lambda f, p: ntkcl_fast.feature_orthogonality(f, p, reduction="sum", **kw), [f, p]),
        ("FeatureOrthogonality", ntkcl_fast.FeatureOrthogonality(normalize=False, **kw), [f, p]),
        ("projection_residual", lambda f: ntkcl_fast.projection_residual(f, u, reduction="sumsq", **kw), [f]),
        ("ProjectionResidual", ntkcl_fast.ProjectionResidual(u, **kw), [f]),
        ("ProjectionResidual trained basis", lambda f, u: ntkcl_fast.projection_residual(f, u, **kw), [f, u]),
        ("gram_orthogonality", lambda a, b: ntkcl_fast.gram_orthogonality([a, b], **kw), ws),
        ("GramOrthogonality", lambda a, b: ntkcl_fast.GramOrthogonality(reduction="sum", **kw)([a, b]), ws),
        ("cross_orthogonality", lambda a, b, c, d: ntkcl_fast.cross_orthogonality([a, b], [c, d], **kw),
         old + new),
        ("CrossOrthogonality", lambda a, b, c, d: ntkcl_fast.CrossOrthogonality(norm="fro2", **kw)([a, b], [c, d]),
         old + new),
        ("ntkcl_contrastive", lambda f: ntkcl_fast.ntkcl_contrastive(f, y, **kw), [f]),
        ("NtkclContrastive", lambda f: ntkcl_fast.NtkclContrastive(temperature=0.5, **kw)(f, y), [f]),
        ("prototype_basis", lambda p: ntkcl_fast.prototype_basis(p, 4).sum(), [p]),
    ]


def _value_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True) if out.requires_grad else [None] * len(leaves)
    return out.detach(), grads


@pytest.mark.parametrize("backend", _backends())
def test_every_function_and_module_under_fullgraph_compile(backend):
    for name, fn, tensors in _calls(backend):
        want, want_grads = _value_and_grads(fn, tensors)
        got, got_grads = _value_and_grads(compiled(fn), tensors)  # aot_eager: trace, fakes, autograd
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} value")
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            assert (g is None) == (w is None), f"{name} grad {i}"
            if w is not None:
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name} grad {i}")


@pytest.mark.parametrize("backend", _backends())
def test_inductor(backend):
    """One graph through inductor: the NTK-CL regularizers (contrastive and projection residual)
    plus the list losses, forward and backward."""
    calls = {name: (fn, tensors) for name, fn, tensors in _calls(backend)}
    fo, (f, p) = calls["feature_orthogonality"]
    nc, _ = calls["ntkcl_contrastive"]
    pr, _ = calls["projection_residual"]
    gram, ws = calls["gram_orthogonality"]

    def loss(f, p, a, b):
        return fo(f, p) + nc(f) + pr(f) + gram(a, b)

    want, want_grads = _value_and_grads(loss, [f, p, *ws])
    got, got_grads = _value_and_grads(compiled(loss, backend="inductor"), [f, p, *ws])
    # inductor may fuse the sum of the four terms differently from eager: a few ulps
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_compiled_graph_calls_the_resolved_op():
    """The traced graph holds the op of the resolved backend, not a backend switch."""
    if _backend.unavailable_reason("cpu", "cpu", "feature_orthogonality"):
        pytest.skip("needs the compiled CPU backend")
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    fn = torch.compile(lambda f, p: ntkcl_fast.feature_orthogonality(f, p, backend="auto"), fullgraph=True,
                       backend=record)
    fn(torch.randn(3, 4), torch.randn(2, 4))
    assert any("ntkcl_fast.feature_orthogonality" in t for t in seen), seen

