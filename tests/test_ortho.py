"""feature_orthogonality, projection_residual and prototype_basis on every backend against the fp64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ntkcl_fast
from ntkcl_fast.reference import ortho as reference

from ._ortho_helpers import (DTYPES, cases, check, eager_feature_orthogonality, eager_projection_residual, pairs,
                             rand)


# ----------------------------------------------------------------------------- feature_orthogonality

SMALL_FO = [(1, 1, 1), (3, 5, 7), (17, 33, 64)]
LARGE_FO = [(256, 200, 768), (32, 100, 2304)]  # NTK-CL: B 256, K 200 classes, ViT-B width and 3x it




_FO_COMBOS = [(dt, nz, red) for dt in DTYPES for nz in (True, False) for red in ("mean", "sum")]
_FO_LARGE = [(dt, True, "mean") for dt in (torch.float32, torch.bfloat16, torch.float64)] + \
    [(torch.float16, False, "sum")]


@pytest.mark.parametrize("device,backend,shape,dtype,normalize,reduction",
                         cases(pairs("feature_orthogonality"), SMALL_FO, LARGE_FO, _FO_COMBOS, _FO_LARGE))
def test_feature_orthogonality(device, backend, shape, dtype, normalize, reduction):
    b, k, d = shape
    gen = torch.Generator().manual_seed(b * 1000 + k * 10 + d)
    f, p = rand(gen, (b, d), device, dtype), rand(gen, (k, d), device, dtype, 0.5)

    def fast(f, p):
        return ntkcl_fast.feature_orthogonality(f, p, normalize=normalize, reduction=reduction, backend=backend)

    check(fast, lambda f, p: reference.feature_orthogonality(f, p, normalize, reduction),
           eager_feature_orthogonality(normalize, reduction), [f, p], backend=backend, device=device,
           what=f"fo {b}x{k}x{d}")


@pytest.mark.parametrize("device,backend", pairs("feature_orthogonality"))
def test_feature_orthogonality_zero_rows_and_one_side(device, backend):
    gen = torch.Generator().manual_seed(3)
    f, p = rand(gen, (5, 16), device, torch.float32), rand(gen, (4, 16), device, torch.float32)
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
@pytest.mark.parametrize("device,backend", pairs("feature_orthogonality"))
def test_feature_orthogonality_one_input_frozen(device, backend, frozen):
    """The trained side's gradient is unchanged when the other side needs none (its GEMM is skipped)."""
    gen = torch.Generator().manual_seed(8)
    f, p = rand(gen, (9, 20), device, torch.float32), rand(gen, (6, 20), device, torch.float32)
    train = p if frozen == "features" else f
    leaf = train.clone().requires_grad_()
    args = (f, leaf) if frozen == "features" else (leaf, p)
    (grad,) = torch.autograd.grad(ntkcl_fast.feature_orthogonality(*args, backend=backend), leaf)
    ref_leaf = train.double().requires_grad_()
    ref_args = (f.double(), ref_leaf) if frozen == "features" else (ref_leaf, p.double())
    (want,) = torch.autograd.grad(reference.feature_orthogonality(*ref_args), ref_leaf)
    torch.testing.assert_close(grad.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device,backend", pairs("feature_orthogonality"))
def test_feature_orthogonality_is_deterministic(device, backend):
    """Value and gradients repeat bit for bit (no float atomics in any reduction)."""
    gen = torch.Generator().manual_seed(10)
    f, p = rand(gen, (37, 50), device, torch.float32), rand(gen, (21, 50), device, torch.float32)
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
                         cases(pairs("projection_residual"), SMALL_PR, LARGE_PR, _PR_COMBOS, _PR_LARGE))
def test_projection_residual(device, backend, shape, dtype, normalize, reduction):
    b, d, r = shape
    gen = torch.Generator().manual_seed(b + d + r)
    f = rand(gen, (b, d), device, dtype)
    protos = torch.randn(max(r, 1) + 3, d, generator=gen, dtype=torch.float64)
    u = ntkcl_fast.prototype_basis(protos, r).to(device, dtype)

    def fast(f, u):
        return ntkcl_fast.projection_residual(f, u, normalize=normalize, reduction=reduction, backend=backend)

    terms = None
    if reduction == "sum":  # a signed sum of the B x D residual entries, which cancel
        f64, u64 = f.double().cpu(), u.double().cpu()
        f64 = F.normalize(f64, dim=1) if normalize else f64
        terms = f64 - f64 @ u64 @ u64.T
    check(fast, lambda f, u: reference.projection_residual(f, u, normalize, reduction),
          eager_projection_residual(normalize, reduction), [f, u], backend=backend, device=device,
          value_terms=terms, what=f"pr {b}x{d}x{r}")


@pytest.mark.parametrize("reduction", ["sum", "sumsq"])
@pytest.mark.parametrize("frozen", ["features", "basis"])
@pytest.mark.parametrize("device,backend", pairs("projection_residual"))
def test_projection_residual_one_input_frozen(device, backend, frozen, reduction):
    """The trained side's gradient is unchanged when the other needs none (the basis is usually a
    frozen buffer: its gradient products are skipped)."""
    gen = torch.Generator().manual_seed(9)
    f = rand(gen, (9, 20), device, torch.float32)
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


