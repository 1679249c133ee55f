"""Orthogonality penalties and NTK-CL feature losses on every backend against the fp64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ntkcl_fast
from ntkcl_fast import ortho
from ntkcl_fast.reference import ortho as reference

from ._helpers import assert_within_budget, device_backends, interpreted_triton

IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _pairs(op: str) -> list:
    return device_backends(op)


def _rand(gen, shape, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device, dtype)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors]


def _grads(fn, tensors):
    """Value and gradients of fn(*tensors) by autograd, for the floating tensors."""
    leaves = _leaves(tensors)
    out = fn(*leaves)
    floating = [t for t in leaves if t.is_floating_point()]
    grads = torch.autograd.grad(out, floating, allow_unused=True) if out.requires_grad and torch.isfinite(out) else \
        [torch.zeros_like(t) for t in floating]
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(floating, grads)]
    return out.detach(), grads


def _check(fast, oracle, eager, tensors, *, backend, device, what=""):
    """Value and every gradient of `fast` within the error budget of the fp64 `oracle`."""
    extra = 1 if interpreted_triton(backend, device) else 0
    t64 = [t.double() if t.is_floating_point() else t for t in tensors]
    want_v, want_g = _grads(oracle, t64)
    eager_v, eager_g = _grads(eager, tensors)
    leaves = _leaves(tensors)
    out = fast(*leaves)
    want_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors if t.is_floating_point()) \
        else torch.float32
    assert out.dtype == want_dtype and out.dim() == 0 and out.requires_grad, (out.dtype, out.shape)
    if torch.isinf(want_v):
        assert torch.isinf(out) and out > 0, f"{what}: expected +inf, got {out}"
    else:
        assert_within_budget(out.detach(), want_v, eager_v, what=f"{what} value")
    out.backward()
    floating = [t for t in leaves if t.is_floating_point()]
    for i, (leaf, w, e) in enumerate(zip(floating, want_g, eager_g)):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        assert torch.isfinite(leaf.grad).all(), f"{what}: grad {i} not finite"
        assert_within_budget(leaf.grad, w, e, extra_ulps=extra, what=f"{what} grad {i} {leaf.dtype}")


# ----------------------------------------------------------------------------- eager baselines
# What users write today, in the inputs' dtype (the budget is relative to their error).

def _eager_feature_orthogonality(normalize, reduction):
    def fn(f, p):
        if normalize:
            f, p = F.normalize(f, dim=1), F.normalize(p, dim=1)
        s = f @ p.T
        return (s ** 2).mean() if reduction == "mean" else (s ** 2).sum()
    return fn


def _eager_projection_residual(normalize, reduction):
    def fn(f, u):
        if normalize:
            f = F.normalize(f, dim=1)
        r = f - f @ u @ u.T
        return r.sum() if reduction == "sum" else (r ** 2).sum()
    return fn


def _eager_gram(reduction):
    def fn(*ws):
        total = 0
        for w in ws:
            g = w @ w.T - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
            total = total + ((g ** 2).mean() if reduction == "mean" else (g ** 2).sum())
        return total
    return fn


def _eager_cross(norm, n):
    def fn(*ts):
        total = 0
        for a, b in zip(ts[:n], ts[n:]):
            p = a @ b.T
            total = total + (p.abs().sum() if norm == "l1" else (p ** 2).sum())
        return total
    return fn


def _eager_contrastive(t):
    def fn(f, labels):
        f = F.normalize(f, dim=1)
        n = f.shape[0]
        s = f @ f.T / t
        eye = torch.eye(n, dtype=torch.bool, device=f.device)
        pos = (labels[:, None] == labels[None, :]) & ~eye
        ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
        return (-torch.logsumexp(torch.where(pos, s, ninf).reshape(-1), 0)
                + torch.logsumexp(torch.where(eye, ninf, s), 1).mean())
    return fn


# ----------------------------------------------------------------------------- feature_orthogonality

SMALL_FO = [(1, 1, 1), (3, 5, 7), (17, 33, 64)]
LARGE_FO = [(256, 200, 768), (32, 100, 2304)]  # NTK-CL: B 256, K 200 classes, ViT-B width and 3x it


def _cases(pairs, small, large, combos, large_combos):
    """(device, backend, shape, *combo): every combo on the small shapes; the large shapes only on
    the compiled and reference backends (the Triton interpreter is slow), with fewer combos."""
    out = []
    for pair in pairs:
        device, backend = pair.values
        if backend != "torch":
            # fp64: the budget rule degenerates (eager fp64 is the oracle itself, error 0), so the
            # compiled backends are checked in fp64 by test_fp64_compiled_backends (assert_close
            # defaults and gradcheck); the Triton kernels take fp16/bf16/fp32 (test_triton_rejects_fp64)
            combos = [c for c in combos if c[0] != torch.float64]
            large_combos = [c for c in large_combos if c[0] != torch.float64]
        for shape in small:
            out += [pytest.param(device, backend, shape, *c, marks=pair.marks) for c in combos]
        if not interpreted_triton(backend, device):
            for shape in large:
                out += [pytest.param(device, backend, shape, *c, marks=pair.marks) for c in large_combos]
    return out


_FO_COMBOS = [(dt, nz, red) for dt in DTYPES for nz in (True, False) for red in ("mean", "sum")]
_FO_LARGE = [(dt, True, "mean") for dt in (torch.float32, torch.bfloat16, torch.float64)] + \
    [(torch.float16, False, "sum")]


@pytest.mark.parametrize("device,backend,shape,dtype,normalize,reduction",
                         _cases(_pairs("feature_orthogonality"), SMALL_FO, LARGE_FO, _FO_COMBOS, _FO_LARGE))
def test_feature_orthogonality(device, backend, shape, dtype, normalize, reduction):
    b, k, d = shape
    gen = torch.Generator().manual_seed(b * 1000 + k * 10 + d)
    f, p = _rand(gen, (b, d), device, dtype), _rand(gen, (k, d), device, dtype, 0.5)

    def fast(f, p):
        return ntkcl_fast.feature_orthogonality(f, p, normalize=normalize, reduction=reduction, backend=backend)

    _check(fast, lambda f, p: reference.feature_orthogonality(f, p, normalize, reduction),
           _eager_feature_orthogonality(normalize, reduction), [f, p], backend=backend, device=device,
           what=f"fo {b}x{k}x{d}")


@pytest.mark.parametrize("device,backend", _pairs("feature_orthogonality"))
def test_feature_orthogonality_zero_rows_and_one_side(device, backend):
    gen = torch.Generator().manual_seed(3)
    f, p = _rand(gen, (5, 16), device, torch.float32), _rand(gen, (4, 16), device, torch.float32)
    f[2] = 0
    p[1] = 0
    leaf = f.clone().requires_grad_()
    out = ntkcl_fast.feature_orthogonality(leaf, p, backend=backend)  # prototypes frozen
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(leaf.grad).all()
    want = reference.feature_orthogonality(f.double(), p.double())
    assert abs(out.item() - want.item()) <= 1e-6 * max(1.0, want.item())
    assert leaf.grad[2].abs().max().item() == 0  # a zero row has zero cosines: nothing pulls it


@pytest.mark.parametrize("frozen", ["features", "prototypes"])
@pytest.mark.parametrize("device,backend", _pairs("feature_orthogonality"))
def test_feature_orthogonality_one_input_frozen(device, backend, frozen):
    """The trained side's gradient is unchanged when the other side needs none (its GEMM is skipped)."""
    gen = torch.Generator().manual_seed(8)
    f, p = _rand(gen, (9, 20), device, torch.float32), _rand(gen, (6, 20), device, torch.float32)
    train = p if frozen == "features" else f
    leaf = train.clone().requires_grad_()
    args = (f, leaf) if frozen == "features" else (leaf, p)
    (grad,) = torch.autograd.grad(ntkcl_fast.feature_orthogonality(*args, backend=backend), leaf)
    ref_leaf = train.double().requires_grad_()
    ref_args = (f.double(), ref_leaf) if frozen == "features" else (ref_leaf, p.double())
    (want,) = torch.autograd.grad(reference.feature_orthogonality(*ref_args), ref_leaf)
    torch.testing.assert_close(grad.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device,backend", _pairs("feature_orthogonality"))
def test_feature_orthogonality_is_deterministic(device, backend):
    """Value and gradients repeat bit for bit (no float atomics in any reduction)."""
    gen = torch.Generator().manual_seed(10)
    f, p = _rand(gen, (37, 50), device, torch.float32), _rand(gen, (21, 50), device, torch.float32)
    runs = []
    for _ in range(2):
        a, b = f.clone().requires_grad_(), p.clone().requires_grad_()
        out = ntkcl_fast.feature_orthogonality(a, b, backend=backend)
        runs.append((out.detach(), *torch.autograd.grad(out, (a, b))))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


# ----------------------------------------------------------------------------- projection_residual

SMALL_PR = [(1, 1, 1), (3, 7, 2), (17, 64, 16)]
LARGE_PR = [(256, 768, 40), (64, 2304, 40)]
_PR_COMBOS = [(dt, nz, red) for dt in DTYPES for nz in (True, False) for red in ("sum", "sumsq")]
_PR_LARGE = [(dt, True, red) for dt in (torch.float32, torch.bfloat16) for red in ("sum", "sumsq")] + \
    [(torch.float16, False, "sumsq")]


@pytest.mark.parametrize("device,backend,shape,dtype,normalize,reduction",
                         _cases(_pairs("projection_residual"), SMALL_PR, LARGE_PR, _PR_COMBOS, _PR_LARGE))
def test_projection_residual(device, backend, shape, dtype, normalize, reduction):
    b, d, r = shape
    gen = torch.Generator().manual_seed(b + d + r)
    f = _rand(gen, (b, d), device, dtype)
    protos = torch.randn(max(r, 1) + 3, d, generator=gen, dtype=torch.float64)
    u = ntkcl_fast.prototype_basis(protos, r).to(device, dtype)

    def fast(f, u):
        return ntkcl_fast.projection_residual(f, u, normalize=normalize, reduction=reduction, backend=backend)

    _check(fast, lambda f, u: reference.projection_residual(f, u, normalize, reduction),
           _eager_projection_residual(normalize, reduction), [f, u], backend=backend, device=device,
           what=f"pr {b}x{d}x{r}")


@pytest.mark.parametrize("reduction", ["sum", "sumsq"])
@pytest.mark.parametrize("frozen", ["features", "basis"])
@pytest.mark.parametrize("device,backend", _pairs("projection_residual"))
def test_projection_residual_one_input_frozen(device, backend, frozen, reduction):
    """The trained side's gradient is unchanged when the other needs none (the basis is usually a
    frozen buffer: its gradient products are skipped)."""
    gen = torch.Generator().manual_seed(9)
    f = _rand(gen, (9, 20), device, torch.float32)
    u = ntkcl_fast.prototype_basis(torch.randn(6, 20, generator=gen), 4).to(device)
    train = u if frozen == "features" else f
    leaf = train.clone().requires_grad_()
    args = (f, leaf) if frozen == "features" else (leaf, u)
    (grad,) = torch.autograd.grad(ntkcl_fast.projection_residual(*args, reduction=reduction, backend=backend), leaf)
    ref_leaf = train.double().requires_grad_()
    ref_args = (f.double(), ref_leaf) if frozen == "features" else (ref_leaf, u.double())
    (want,) = torch.autograd.grad(reference.projection_residual(*ref_args, True, reduction), ref_leaf)
    torch.testing.assert_close(grad.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-6)


def test_prototype_basis_is_ntkcl_svd():
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 32, generator=gen)
    u = ntkcl_fast.prototype_basis(protos, 6)
    want = torch.linalg.svd(F.normalize(protos.T, dim=0), full_matrices=True)[0][:, :6]
    assert u.shape == (32, 6) and u.dtype == torch.float32
    torch.testing.assert_close(u, want)
    torch.testing.assert_close(u.T @ u, torch.eye(6), atol=1e-5, rtol=0)
    assert ntkcl_fast.prototype_basis(protos.double(), 32).shape == (32, 32)
    with pytest.raises(ValueError, match="rank"):
        ntkcl_fast.prototype_basis(protos, 33)
    with pytest.raises(ValueError, match="prototypes"):
        ntkcl_fast.prototype_basis(protos[0], 1)


# ----------------------------------------------------------------------------- gram_orthogonality

GRAM_LISTS = {
    "one-1x1": [(1, 1)],
    "mixed": [(3, 7), (16, 33), (1, 5), (8, 64)],
    "24-layers": [(8, 64)] * 24,
    "coda-p": [(10, 768)] * 5,  # large: not on the interpreter
    "coda-p-pool": [(100, 768)] * 2,
}
_LISTS_COMBOS = [(dt, red) for dt in DTYPES for red in ("mean", "sum")]


@pytest.mark.parametrize("device,backend,case,dtype,reduction",
                         _cases(_pairs("gram_orthogonality"), list(GRAM_LISTS)[:3], list(GRAM_LISTS)[3:],
                                _LISTS_COMBOS, _LISTS_COMBOS))
def test_gram_orthogonality(device, backend, case, dtype, reduction):
    shapes = GRAM_LISTS[case]
    gen = torch.Generator().manual_seed(len(shapes))
    ws = [_rand(gen, s, device, dtype, s[1] ** -0.5) for s in shapes]

    def fast(*ws):
        return ntkcl_fast.gram_orthogonality(list(ws), reduction=reduction, backend=backend)

    _check(fast, lambda *ws: reference.gram_orthogonality(list(ws), reduction), _eager_gram(reduction), ws,
           backend=backend, device=device, what=f"gram {case}")


# ----------------------------------------------------------------------------- cross_orthogonality

CROSS_LISTS = {
    "one-1x1": ([(1, 1)], [(1, 1)]),
    "mixed": ([(3, 7), (16, 33), (8, 64)], [(5, 7), (8, 33), (1, 64)]),
    "24-layers": ([(8, 64)] * 24, [(8, 64)] * 24),
    "o-lora-12": ([(8, 768)] * 12, [(8, 768)] * 12),  # large: not on the interpreter
    "o-lora-old-tasks": ([(40, 1536)] * 3, [(8, 1536)] * 3),
}
_CROSS_COMBOS = [(dt, nm) for dt in DTYPES for nm in ("l1", "fro2")]


@pytest.mark.parametrize("device,backend,case,dtype,norm",
                         _cases(_pairs("cross_orthogonality"), list(CROSS_LISTS)[:3], list(CROSS_LISTS)[3:],
                                _CROSS_COMBOS, _CROSS_COMBOS))
def test_cross_orthogonality(device, backend, case, dtype, norm):
    old_s, new_s = CROSS_LISTS[case]
    gen = torch.Generator().manual_seed(len(old_s))
    old = [_rand(gen, s, device, dtype, s[1] ** -0.5) for s in old_s]
    new = [_rand(gen, s, device, dtype, s[1] ** -0.5) for s in new_s]
    n = len(old)

    def fast(*ts):
        return ntkcl_fast.cross_orthogonality(list(ts[:n]), list(ts[n:]), norm=norm, backend=backend)

    _check(fast, lambda *ts: reference.cross_orthogonality(ts[:n], ts[n:], norm), _eager_cross(norm, n),
           old + new, backend=backend, device=device, what=f"cross {case}")


@pytest.mark.parametrize("frozen", ["old", "new"])
@pytest.mark.parametrize("norm", ["l1", "fro2"])
@pytest.mark.parametrize("device,backend", _pairs("cross_orthogonality"))
def test_cross_orthogonality_one_side_frozen(device, backend, norm, frozen):
    """O-LoRA freezes the old tasks' matrices: the trained side's gradient is unchanged and the
    frozen side gets none."""
    gen = torch.Generator().manual_seed(5)
    old = [_rand(gen, s, device, torch.float32) for s in [(6, 16), (4, 24)]]
    new = [_rand(gen, s, device, torch.float32) for s in [(3, 16), (2, 24)]]
    train = new if frozen == "old" else old
    for t in train:
        t.requires_grad_()
    out = ntkcl_fast.cross_orthogonality(old, new, norm=norm, backend=backend)
    grads = torch.autograd.grad(out, train)
    o64 = [t.detach().double().requires_grad_(frozen == "new") for t in old]
    n64 = [t.detach().double().requires_grad_(frozen == "old") for t in new]
    ref = reference.cross_orthogonality(o64, n64, norm)
    want = torch.autograd.grad(ref, n64 if frozen == "old" else o64)
    torch.testing.assert_close(out.double().cpu(), ref.detach().cpu(), rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=1e-5, atol=1e-5)
    assert all(t.grad is None for t in (old if frozen == "old" else new))


# ----------------------------------------------------------------------------- ntkcl_contrastive

SMALL_NC = [(2, 1), (5, 3), (33, 64)]
LARGE_NC = [(256, 768), (96, 1536)]
_NC_COMBOS = [(dt, t) for dt in DTYPES for t in (0.01, 0.1, 1.0)]
_NC_LARGE = [(torch.float32, 0.01), (torch.bfloat16, 0.1), (torch.float64, 1.0), (torch.float16, 0.1)]


@pytest.mark.parametrize("device,backend,shape,dtype,temperature",
                         _cases(_pairs("ntkcl_contrastive"), SMALL_NC, LARGE_NC, _NC_COMBOS, _NC_LARGE))
def test_ntkcl_contrastive(device, backend, shape, dtype, temperature):
    n, d = shape
    gen = torch.Generator().manual_seed(n * 7 + d)
    f = _rand(gen, (n, d), device, dtype)
    labels = torch.randint(0, max(1, n // 3), (n,), generator=gen).to(device)
    labels[1] = labels[0]  # at least one positive pair

    def fast(f, y):
        return ntkcl_fast.ntkcl_contrastive(f, y, temperature=temperature, backend=backend)

    _check(fast, lambda f, y: reference.ntkcl_contrastive(f, y, temperature), _eager_contrastive(temperature),
           [f, labels], backend=backend, device=device, what=f"nc {n}x{d} t={temperature}")


@pytest.mark.parametrize("device,backend", _pairs("ntkcl_contrastive"))
@pytest.mark.parametrize("n", [1, 2, 7])
def test_ntkcl_contrastive_no_positive_pair_is_inf(device, backend, n):
    f = torch.randn(n, 16).to(device).requires_grad_()
    out = ntkcl_fast.ntkcl_contrastive(f, torch.arange(n, device=device), backend=backend)
    assert torch.isinf(out) and out > 0
    out.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


@pytest.mark.parametrize("device,backend", _pairs("ntkcl_contrastive"))
def test_ntkcl_contrastive_zero_rows(device, backend):
    f = torch.randn(6, 16).to(device)
    f[3] = 0
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    leaf = f.clone().requires_grad_()
    out = ntkcl_fast.ntkcl_contrastive(leaf, labels, temperature=0.05, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(leaf.grad).all()
    want = reference.ntkcl_contrastive(f.double(), labels, 0.05)
    assert abs(out.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


# ----------------------------------------------------------------------------- gradcheck on the reference

def test_gradcheck_reference():
    gen = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    f, p = r(4, 6), r(3, 6)
    for normalize in (True, False):
        for red in ("mean", "sum"):
            assert torch.autograd.gradcheck(lambda f, p: reference.feature_orthogonality(f, p, normalize, red), (f, p))
        for red in ("sum", "sumsq"):
            assert torch.autograd.gradcheck(lambda f, u: reference.projection_residual(f, u, normalize, red),
                                            (f, r(6, 2)))
    ws = [r(3, 5), r(2, 4)]
    for red in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda *ws: reference.gram_orthogonality(ws, red), ws)
    a, b = [r(2, 5), r(3, 4)], [r(3, 5), r(1, 4)]
    for norm in ("l1", "fro2"):
        assert torch.autograd.gradcheck(lambda *t: reference.cross_orthogonality(t[:2], t[2:], norm), a + b)
    labels = torch.tensor([0, 1, 0, 1, 2])
    for t in (0.01, 0.1, 1.0):
        assert torch.autograd.gradcheck(lambda f: reference.ntkcl_contrastive(f, labels, t), (r(5, 6),))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gradcheck_public_api(backend):
    gen = torch.Generator().manual_seed(12)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    kw = {"backend": backend}
    assert torch.autograd.gradcheck(lambda f, p: ntkcl_fast.feature_orthogonality(f, p, **kw), (r(4, 6), r(3, 6)))
    assert torch.autograd.gradcheck(
        lambda f, u: ntkcl_fast.projection_residual(f, u, reduction="sumsq", **kw), (r(4, 6), r(6, 2)))
    assert torch.autograd.gradcheck(lambda f, u: ntkcl_fast.projection_residual(f, u, **kw), (r(4, 6), r(6, 2)))
    assert torch.autograd.gradcheck(lambda a, b: ntkcl_fast.gram_orthogonality([a, b], **kw), (r(3, 5), r(2, 4)))
    assert torch.autograd.gradcheck(lambda a, b: ntkcl_fast.cross_orthogonality([a], [b], **kw), (r(2, 5), r(3, 5)))
    assert torch.autograd.gradcheck(
        lambda a, b: ntkcl_fast.cross_orthogonality([a], [b], norm="fro2", **kw), (r(2, 5), r(3, 5)))
    labels = torch.tensor([0, 1, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda f: ntkcl_fast.ntkcl_contrastive(f, labels, **kw), (r(5, 6),))


# ----------------------------------------------------------------------------- modules, empty, bad input

def test_modules_match_functions():
    gen = torch.Generator().manual_seed(5)
    f, p = torch.randn(6, 8, generator=gen), torch.randn(4, 8, generator=gen)
    assert torch.equal(ntkcl_fast.FeatureOrthogonality(reduction="sum")(f, p),
                       ntkcl_fast.feature_orthogonality(f, p, reduction="sum"))
    mod = ntkcl_fast.ProjectionResidual.from_prototypes(p, 2)
    assert "basis" in dict(mod.named_buffers())
    assert torch.equal(mod(f), ntkcl_fast.projection_residual(f, mod.basis))
    ws = [torch.randn(3, 8, generator=gen)]
    assert torch.equal(ntkcl_fast.GramOrthogonality()(ws), ntkcl_fast.gram_orthogonality(ws))
    assert torch.equal(ntkcl_fast.CrossOrthogonality(norm="fro2")(ws, ws),
                       ntkcl_fast.cross_orthogonality(ws, ws, norm="fro2"))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(ntkcl_fast.NtkclContrastive(temperature=0.2)(f, y),
                       ntkcl_fast.ntkcl_contrastive(f, y, temperature=0.2))


def test_empty_inputs_are_zero():
    e = torch.zeros(0, 8, requires_grad=True)
    p = torch.randn(3, 8)
    out = ntkcl_fast.feature_orthogonality(e, p)
    assert out.item() == 0
    out.backward()
    assert ntkcl_fast.projection_residual(torch.zeros(0, 4), torch.zeros(4, 2)).item() == 0
    assert ntkcl_fast.gram_orthogonality([]).item() == 0
    assert ntkcl_fast.gram_orthogonality([torch.zeros(0, 4)]).item() == 0
    assert ntkcl_fast.cross_orthogonality([], []).item() == 0


@pytest.mark.parametrize("call,match,exc", [
    (lambda: ntkcl_fast.feature_orthogonality(torch.randn(3), torch.randn(2, 3)), "features", ValueError),
    (lambda: ntkcl_fast.feature_orthogonality(torch.randn(3, 4), torch.randn(2, 5)), "prototypes", ValueError),
    (lambda: ntkcl_fast.feature_orthogonality(torch.randn(3, 4), torch.randn(2, 4, 1)), "prototypes", ValueError),
    (lambda: ntkcl_fast.feature_orthogonality(torch.ones(3, 4, dtype=torch.int64), torch.randn(2, 4)), "features",
     TypeError),
    (lambda: ntkcl_fast.feature_orthogonality(torch.randn(3, 4), torch.randn(2, 4), reduction="max"), "reduction",
     ValueError),
    (lambda: ntkcl_fast.feature_orthogonality(torch.randn(3, 4), torch.randn(2, 4), backend="nope"), "backend",
     ValueError),
    (lambda: ntkcl_fast.projection_residual(torch.randn(3, 4), torch.randn(5, 2)), "basis", ValueError),
    (lambda: ntkcl_fast.projection_residual(torch.randn(3, 4), torch.randn(4, 2), reduction="mean"), "reduction",
     ValueError),
    (lambda: ntkcl_fast.gram_orthogonality([torch.randn(3, 4), torch.randn(4)]), r"weights\[1\]", ValueError),
    (lambda: ntkcl_fast.gram_orthogonality([torch.randn(3, 4)], reduction="l1"), "reduction", ValueError),
    (lambda: ntkcl_fast.cross_orthogonality([torch.randn(3, 4)], []), "old", ValueError),
    (lambda: ntkcl_fast.cross_orthogonality([torch.randn(3, 4), torch.randn(2, 4)],
                                            [torch.randn(3, 4), torch.randn(2, 5)]), r"old\[1\]", ValueError),
    (lambda: ntkcl_fast.cross_orthogonality([torch.randn(3, 4)], [torch.randn(3, 4)], norm="l2"), "norm",
     ValueError),
    (lambda: ntkcl_fast.ntkcl_contrastive(torch.randn(3, 4), torch.zeros(4, dtype=torch.long)), "labels",
     ValueError),
    (lambda: ntkcl_fast.ntkcl_contrastive(torch.randn(3, 4), torch.zeros(3)), "labels", TypeError),
    (lambda: ntkcl_fast.ntkcl_contrastive(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), temperature=0.0),
     "temperature", ValueError),
    (lambda: ntkcl_fast.ntkcl_contrastive(torch.randn(3, 4), torch.zeros(3, dtype=torch.long),
                                          temperature=float("nan")), "temperature", ValueError),
])
def test_bad_input_raises_naming_the_argument(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


def test_unavailable_backend_raises_runtime_error():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match="cuda"):
        ntkcl_fast.feature_orthogonality(torch.randn(3, 4), torch.randn(2, 4), backend="cuda")
    assert ortho._resolve("auto", torch.device("cpu"), "feature_orthogonality") in ("cpu", "torch")


def test_auto_takes_the_one_launch_triton_lists_on_cuda(monkeypatch):
    """On CUDA, "auto" runs gram / cross on Triton (one launch per list) unless a tensor is fp64;
    the other ops keep the compiled-first order."""
    from ntkcl_fast import _backend as backend_mod
    monkeypatch.setattr(backend_mod, "unavailable_reason", lambda *args, **kwargs: None)
    cuda = torch.device("cuda")
    for op in ("gram_orthogonality", "cross_orthogonality"):
        assert ortho._resolve("auto", cuda, op, [torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)]) == "triton"
        assert ortho._resolve("auto", cuda, op, [torch.zeros(1, dtype=torch.float64)]) == "cuda"
        assert ortho._resolve("cuda", cuda, op, [torch.zeros(1)]) == "cuda"
    assert ortho._resolve("auto", cuda, "feature_orthogonality") == "cuda"
    assert ortho._resolve("auto", torch.device("cpu"), "gram_orthogonality", [torch.zeros(1)]) == "cpu"


# ----------------------------------------------------------------------------- opcheck of the registered ops

def _fo_kept(f, p, normalize, mean):
    """(S, ||f||, ||p||) as the forward op returns them for its backward."""
    return torch.ops.ntkcl_fast.feature_orthogonality(f, p, normalize, mean)[1:]


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(21)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    go = torch.tensor(0.7, device=device)
    f, p, u = r(5, 8), r(3, 8), r(8, 2)
    labels = torch.tensor([0, 1, 0, 1, 2], device=device)
    no_pos = torch.arange(5, device=device)
    ws = [r(3, 8), r(4, 6, dtype=torch.bfloat16)]
    old, new = [r(2, 8), r(3, 6)], [r(4, 8), r(1, 6)]
    return [
        ("feature_orthogonality", (f, p, True, True)),
        ("feature_orthogonality", (f.to(torch.bfloat16), p, False, False)),
        ("feature_orthogonality_backward", (go, *_fo_kept(f, p, True, True), f, p, True, True, True, True)),
        ("feature_orthogonality_backward", (go, *_fo_kept(f, p, False, False), f, p, False, False, True, False)),
        ("feature_orthogonality_backward", (go, *_fo_kept(f, p, True, False), f, p, True, False, False, True)),
        ("projection_residual", (f, u, True, False)),
        ("projection_residual", (f, u, False, True)),
        ("projection_residual_backward", (go, f, u, True, True, True, True)),
        ("projection_residual_backward", (go, f, u, False, False, True, False)),
        ("projection_residual_backward", (go, f, u, True, True, False, True)),
        ("gram_orthogonality", (ws, True)),
        ("gram_orthogonality_backward", (go, torch.ops.ntkcl_fast.gram_orthogonality(ws, False)[1], ws, False)),
        ("cross_orthogonality", (old, new, True)),
        ("cross_orthogonality_backward", (go, torch.ops.ntkcl_fast.cross_orthogonality(old, new, False)[1], old, new,
                                          False, True, True)),
        ("cross_orthogonality_backward", (go, torch.ops.ntkcl_fast.cross_orthogonality(old, new, True)[1], old, new,
                                          True, False, True)),
        ("ntkcl_contrastive", (f, labels, 0.1)),
        ("ntkcl_contrastive_backward", (go, *torch.ops.ntkcl_fast.ntkcl_contrastive(f, labels, 0.1)[1:], f, labels,
                                        0.1)),
        ("ntkcl_contrastive_backward", (go, *torch.ops.ntkcl_fast.ntkcl_contrastive(f, no_pos, 0.1)[1:], f, no_pos,
                                        0.1)),
    ]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
def test_opcheck(device):
    if _backend_reason(device):
        pytest.fail(_backend_reason(device))
    for op, args in _opcheck_cases(device):
        # inputs do not require grad: the gradient of each op is its *_backward op, called from the
        # autograd.Function in ntkcl_fast/ortho.py, which test_under_torch_compile covers
        torch.library.opcheck(getattr(torch.ops.ntkcl_fast, op), args)


def _backend_reason(device):
    from ntkcl_fast import _backend as backend_mod
    return backend_mod.unavailable_reason(device, device, "feature_orthogonality")


def test_under_torch_compile():
    f = torch.randn(6, 8, requires_grad=True)
    p = torch.randn(4, 8)

    def loss(f, p):
        return ntkcl_fast.feature_orthogonality(f, p, backend="cpu") + \
            ntkcl_fast.ntkcl_contrastive(f, torch.tensor([0, 0, 1, 1, 2, 2]), backend="cpu")

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=False)
    out = compiled(f, p)
    out.backward()
    g = f.grad.clone()
    f.grad = None
    want = loss(f, p)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, f.grad)


@pytest.mark.parametrize("device,backend", [p for p in _pairs("feature_orthogonality") if p.values[1] == "triton"])
def test_triton_rejects_fp64(device, backend):
    f = torch.randn(3, 4, dtype=torch.float64, device=device)
    kw = {"backend": backend}
    calls = [lambda: ntkcl_fast.feature_orthogonality(f, f, **kw),
             lambda: ntkcl_fast.projection_residual(f, f.T[:, :2], **kw),
             lambda: ntkcl_fast.gram_orthogonality([f.float(), f], **kw),
             lambda: ntkcl_fast.cross_orthogonality([f], [f.float()], **kw),
             lambda: ntkcl_fast.ntkcl_contrastive(f, torch.zeros(3, dtype=torch.long, device=device), **kw)]
    for call in calls:
        with pytest.raises(TypeError, match="fp64"):
            call()


@pytest.mark.parametrize("device,backend", _pairs("gram_orthogonality"))
def test_lists_of_mixed_dtypes(device, backend):
    """One call over layers stored in different dtypes (fp32 and bf16 adapters side by side)."""
    gen = torch.Generator().manual_seed(41)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    ws = [_rand(gen, s, device, dt, 0.3) for s, dt in zip([(3, 7), (16, 33), (1, 5), (8, 64)], dtypes)]
    old = [_rand(gen, s, device, dt, 0.3) for s, dt in zip([(3, 7), (16, 33), (8, 64)], dtypes)]
    new = [_rand(gen, s, device, dt, 0.3) for s, dt in zip([(5, 7), (8, 33), (1, 64)], dtypes)]
    for reduction in ("mean", "sum"):
        _check(lambda *w: ntkcl_fast.gram_orthogonality(list(w), reduction=reduction, backend=backend),
               lambda *w: reference.gram_orthogonality(list(w), reduction), _eager_gram(reduction), ws,
               backend=backend, device=device, what=f"gram mixed {reduction}")
    for norm in ("l1", "fro2"):
        _check(lambda *t: ntkcl_fast.cross_orthogonality(list(t[:3]), list(t[3:]), norm=norm, backend=backend),
               lambda *t: reference.cross_orthogonality(t[:3], t[3:], norm), _eager_cross(norm, 3), old + new,
               backend=backend, device=device, what=f"cross mixed {norm}")


@pytest.mark.parametrize("device,backend", [p for p in _pairs("feature_orthogonality") if p.values[1] in ("cpu", "cuda")])
def test_fp64_compiled_backends(device, backend):
    """fp64 on the compiled ops: values and gradients equal the reference within assert_close's
    fp64 defaults, and gradcheck (numerical vs the closed-form backward) passes."""
    gen = torch.Generator().manual_seed(31)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0], device=device)
    cases = []
    for nz in (True, False):
        for red in ("mean", "sum"):
            cases.append((lambda f, p, nz=nz, red=red, b=backend: ntkcl_fast.feature_orthogonality(
                f, p, normalize=nz, reduction=red, backend=b),
                lambda f, p, nz=nz, red=red: reference.feature_orthogonality(f, p, nz, red), (r(7, 9), r(5, 9))))
        for red in ("sum", "sumsq"):
            cases.append((lambda f, u, nz=nz, red=red, b=backend: ntkcl_fast.projection_residual(
                f, u, normalize=nz, reduction=red, backend=b),
                lambda f, u, nz=nz, red=red: reference.projection_residual(f, u, nz, red), (r(7, 9), r(9, 3))))
    for red in ("mean", "sum"):
        cases.append((lambda a, c, red=red, b=backend: ntkcl_fast.gram_orthogonality([a, c], reduction=red, backend=b),
                      lambda a, c, red=red: reference.gram_orthogonality([a, c], red), (r(4, 9), r(3, 5))))
    for norm in ("l1", "fro2"):
        cases.append((lambda a, c, norm=norm, b=backend: ntkcl_fast.cross_orthogonality([a], [c], norm=norm, backend=b),
                      lambda a, c, norm=norm: reference.cross_orthogonality([a], [c], norm), (r(4, 9), r(3, 9))))
    for t in (0.01, 0.1, 1.0):
        cases.append((lambda f, t=t, b=backend: ntkcl_fast.ntkcl_contrastive(f, labels, temperature=t, backend=b),
                      lambda f, t=t: reference.ntkcl_contrastive(f, labels, t), (r(7, 9),)))
    for fast, ref, args in cases:
        out, want = fast(*args), ref(*args)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(torch.autograd.grad(out, args), torch.autograd.grad(want, args))
        assert torch.autograd.gradcheck(fast, args)


def test_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter does not type-check like the compiler (nor check shared memory against a
    GPU's limit): compile every orthogonality kernel to PTX for both targets too."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).resolve().parent.parent / "scripts" / "compile_triton_ortho.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
