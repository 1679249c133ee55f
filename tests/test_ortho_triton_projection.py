"""Triton `projection_residual`: shapes and inputs the shared ortho tests do not reach.

Ranks that are not powers of two (padded to a constexpr block), more than one tile of D and of
B, zero and clamped rows, a basis that is not orthonormal, features almost inside span(U) (where
|f|^2 - |c|^2 would cancel), one input frozen, mixed dtypes, fp64 rejection and bitwise
repeatability. Small shapes: on CPU the kernels run in Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.reference import ortho as reference

from ._helpers import assert_within_budget, assert_within_budget_of_sum, device_backends, interpreted_triton
from ._ortho_helpers import eager_projection_residual as _eager

PAIRS = [p for p in device_backends("projection_residual") if p.values[1] == "triton"]


def _value_and_grads(fn, f, u, need=(True, True)):
    f = f.detach().clone().requires_grad_(need[0])
    u = u.detach().clone().requires_grad_(need[1])
    out = fn(f, u)
    leaves = [t for t in (f, u) if t.requires_grad]
    grads = torch.autograd.grad(out, leaves)
    it = iter(grads)
    return out.detach(), [next(it) if n else None for n in need]


def _check(device, f, u, normalize, reduction, eager=None, need=(True, True), what=""):
    """Value and gradients of the Triton op within the error budget of the fp64 reference."""
    extra = 1 if interpreted_triton("triton", device) else 0
    want_v, want_g = _value_and_grads(lambda a, b: reference.projection_residual(a, b, normalize, reduction),
                                      f.double(), u.double(), need)
    eager_v, eager_g = _value_and_grads(eager or _eager(normalize, reduction), f, u, need)
    out, grads = _value_and_grads(lambda a, b: ntkcl_fast.projection_residual(
        a, b, normalize=normalize, reduction=reduction, backend="triton"), f, u, need)
    assert out.dtype == torch.float32 and out.dim() == 0
    if reduction == "sum":
        # a signed sum of B x D residual entries: its rounding error scales with sum |r_ij| (see
        # assert_within_budget_of_sum), which unnormalized rows make thousands of times the value
        f64, u64 = f.double(), u.double()
        f64 = torch.nn.functional.normalize(f64, dim=1) if normalize else f64
        assert_within_budget_of_sum(out, want_v, eager_v, f64 - f64 @ u64 @ u64.T, what=f"{what} value")
    else:
        assert_within_budget(out, want_v, eager_v, what=f"{what} value")
    for i, (g, w, e, x) in enumerate(zip(grads, want_g, eager_g, (f, u))):
        if g is None:
            continue
        assert g.dtype == x.dtype and g.shape == x.shape
        assert torch.isfinite(g).all(), f"{what}: grad {i} not finite"
        assert_within_budget(g, w, e, extra_ulps=extra, what=f"{what} grad {i} {g.dtype}")


def _basis(gen, d, r, device, dtype):
    protos = torch.randn(r + 3, d, generator=gen, dtype=torch.float64)
    return ntkcl_fast.prototype_basis(protos, r).to(device, dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [5, 40])
def test_ranks_not_powers_of_two(device, backend, dtype, rank):
    """B = 33 (three row blocks, a partial last one), D = 96 (several D tiles, one partial), R = 5
    and 40 (padded to 16 and 64)."""
    gen = torch.Generator().manual_seed(rank)
    f = torch.randn(33, 96, generator=gen).to(device, dtype)
    u = _basis(gen, 96, rank, device, dtype)
    for normalize in (True, False):
        for reduction in ("sum", "sumsq"):
            _check(device, f, u, normalize, reduction, what=f"33x96x{rank} {dtype} nz={normalize} {reduction}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("reduction", ["sum", "sumsq"])
def test_basis_not_orthonormal(device, backend, reduction):
    gen = torch.Generator().manual_seed(11)
    f = torch.randn(20, 48, generator=gen).to(device)
    u = (0.3 * torch.randn(48, 7, generator=gen)).to(device)
    for normalize in (True, False):
        _check(device, f, u, normalize, reduction, what=f"random U nz={normalize} {reduction}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("reduction", ["sum", "sumsq"])
def test_zero_and_clamped_rows(device, backend, reduction):
    """A zero row and a row of norm < 1e-12 (normalized as x / 1e-12): finite, and the clamped
    row gets autograd's d f_n / 1e-12 (no projection onto the row's direction)."""
    gen = torch.Generator().manual_seed(7)
    f = torch.randn(18, 40, generator=gen)
    f[3] = 0
    f[16] = torch.randn(40, generator=gen) * 1e-14  # norm ~ 6e-14 < 1e-12
    u = _basis(gen, 40, 6, "cpu", torch.float32)
    f, u = f.to(device), u.to(device)
    for dtype in (torch.float32, torch.bfloat16):
        _check(device, f.to(dtype), u.to(dtype), True, reduction, what=f"zero rows {dtype} {reduction}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_small_residual_sumsq(device, backend):
    """Features almost inside span(U): the residual is ~1e-3 of the features, so the value is
    ~1e-6 of |f|^2; forming r explicitly keeps it to the eager fp32 accuracy."""
    gen = torch.Generator().manual_seed(13)
    u = _basis(gen, 64, 12, "cpu", torch.float32)
    f = torch.randn(24, 12, generator=gen) @ u.T + 1e-3 * torch.randn(24, 64, generator=gen)
    f, u = f.to(device), u.to(device)
    for normalize in (True, False):
        _check(device, f, u, normalize, "sumsq", what=f"small residual nz={normalize}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("frozen", ["features", "basis"])
def test_one_input_frozen(device, backend, frozen):
    gen = torch.Generator().manual_seed(17)
    f = torch.randn(9, 24, generator=gen).to(device)
    u = _basis(gen, 24, 3, device, torch.float32)
    need = (frozen != "features", frozen != "basis")
    for reduction in ("sum", "sumsq"):
        _check(device, f, u, True, reduction, need=need, what=f"{frozen} frozen {reduction}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_mixed_dtypes(device, backend):
    """bf16 features with an fp32 basis: math in fp32, each gradient in its input's dtype."""
    gen = torch.Generator().manual_seed(19)
    f = torch.randn(17, 32, generator=gen).to(device, torch.bfloat16)
    u = _basis(gen, 32, 4, device, torch.float32)

    def eager(normalize, reduction):
        inner = _eager(normalize, reduction)
        return lambda a, b: inner(a, b.to(a.dtype))

    for reduction in ("sum", "sumsq"):
        _check(device, f, u, True, reduction, eager=eager(True, reduction), what=f"mixed {reduction}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_rank_zero(device, backend):
    """An empty basis: r = f_n, the basis gradient is empty."""
    gen = torch.Generator().manual_seed(23)
    f = torch.randn(5, 16, generator=gen).to(device).requires_grad_()
    u = torch.zeros(16, 0, device=device, requires_grad=True)
    for reduction in ("sum", "sumsq"):
        out = ntkcl_fast.projection_residual(f, u, reduction=reduction, backend="triton")
        gf, gu = torch.autograd.grad(out, (f, u))
        want = reference.projection_residual(f.detach().double(), u.detach().double(), True, reduction)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        assert gu.shape == (16, 0) and torch.isfinite(gf).all()


@pytest.mark.parametrize("device,backend", PAIRS)
def test_repeatable(device, backend):
    """Fixed-order reductions: the same inputs give bitwise the same value and gradients."""
    gen = torch.Generator().manual_seed(29)
    f = torch.randn(40, 80, generator=gen).to(device)
    u = _basis(gen, 80, 10, device, torch.float32)
    runs = []
    for _ in range(2):
        a, b = f.clone().requires_grad_(), u.clone().requires_grad_()
        out = ntkcl_fast.projection_residual(a, b, reduction="sumsq", backend="triton")
        runs.append((out.detach(), *torch.autograd.grad(out, (a, b))))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_rejects_fp64(device, backend):
    from ntkcl_fast.triton import projection
    f = torch.randn(3, 4, dtype=torch.float64, device=device)
    u = torch.randn(4, 2, device=device)
    for a, b in ((f, u), (f.float(), u.double())):
        with pytest.raises(RuntimeError, match="fp64"):
            projection.projection_residual(a, b, True, False)
        with pytest.raises(RuntimeError, match="fp64"):
            projection.projection_residual_backward(torch.ones((), device=device), a, b, True, True, True, True)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_large_rank(device, backend):
    """R = 300 (padded to 512): the large-rank configuration (16-row steps in the basis kernel)."""
    gen = torch.Generator().manual_seed(31)
    f = torch.randn(20, 320, generator=gen).to(device)
    u = _basis(gen, 320, 300, device, torch.float32)
    for reduction in ("sum", "sumsq"):
        _check(device, f, u, True, reduction, what=f"rank 300 {reduction}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_rank_limit(device, backend):
    f = torch.randn(2, 600, device=device)
    u = torch.zeros(600, 513, device=device)
    with pytest.raises(ValueError, match="rank"):
        ntkcl_fast.projection_residual(f, u, backend="triton")
