"""ntkcl_contrastive on the Triton backend: shapes that leave partial blocks, label dtypes, one label
for every row, t = 0.01 on nearly parallel rows, zero rows, grad_output scaling and run-to-run
determinism, each against the fp64 reference within the error budget of eager PyTorch."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.reference import ortho as reference

from ._helpers import assert_within_budget, device_backends, interpreted_triton
from ._ortho_helpers import eager_contrastive as _eager

PAIRS = [p for p in device_backends("ntkcl_contrastive") if p.values[1] == "triton"]


def _value_and_grad(fn, f, labels, scale=1.0):
    leaf = f.detach().clone().requires_grad_()
    out = fn(leaf, labels)
    (out * scale).backward()
    return out.detach(), leaf.grad


def _check(f, labels, t, *, backend, device, scale=1.0):
    """Value and gradient of the Triton op within the budget of eager PyTorch vs the fp64 reference."""
    fast = lambda x, y: ntkcl_fast.ntkcl_contrastive(x, y, temperature=t, backend=backend)  # noqa: E731
    want_v, want_g = _value_and_grad(lambda x, y: reference.ntkcl_contrastive(x, y, t), f.double(), labels, scale)
    eager_v, eager_g = _value_and_grad(_eager(t), f, labels, scale)
    out, grad = _value_and_grad(fast, f, labels, scale)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert grad.dtype == f.dtype and grad.shape == f.shape and torch.isfinite(grad).all()
    extra = 1 if interpreted_triton(backend, device) else 0
    assert_within_budget(out, want_v, eager_v, what=f"value t={t}")
    assert_within_budget(grad, want_g, eager_g, extra_ulps=extra, what=f"grad t={t} {f.dtype}")


def _features(n, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, d), generator=gen).to(device, dtype)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("n", [37, 70])  # 16-row blocks: partial last row and column block
@pytest.mark.parametrize("dtype,t", [(torch.float32, 0.01), (torch.bfloat16, 0.1), (torch.float16, 1.0)])
def test_partial_blocks(device, backend, n, dtype, t):
    f = _features(n, 40, dtype, device, n)  # D = 40: a partial 32-wide D block too
    labels = (torch.arange(n) % 9).to(device)
    _check(f, labels, t, backend=backend, device=device)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.bool, torch.uint8, torch.int16])
def test_label_dtypes(device, backend, label_dtype):
    f = _features(21, 24, torch.float32, device, 3)
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 2 if label_dtype == torch.bool else 5, (21,), generator=gen)
    labels = labels.to(device, label_dtype)
    _check(f, labels, 0.1, backend=backend, device=device)
    # the same value as with int64 labels
    a = ntkcl_fast.ntkcl_contrastive(f, labels, temperature=0.1, backend=backend)
    b = ntkcl_fast.ntkcl_contrastive(f, labels.long(), temperature=0.1, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_int64_labels_compared_exactly(device, backend):
    """Labels that differ only above 2^32 (or only in the low bit of a large value) are different."""
    f = _features(8, 16, torch.float32, device, 5)
    big = 2 ** 40
    labels = torch.tensor([big, big, big + 1, big + 1, 2 * big, 2 * big, 3, 3], device=device)
    _check(f, labels, 0.1, backend=backend, device=device)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("t", [0.01, 1.0])
def test_one_label_for_all_rows(device, backend, t):
    f = _features(19, 32, torch.float32, device, 6)
    _check(f, torch.zeros(19, dtype=torch.long, device=device), t, backend=backend, device=device)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nearly_parallel_rows_at_t_001(device, backend, dtype):
    """Every S_ij close to 1/t = 100: exp overflows without the max subtraction."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1, 48, generator=gen)
    f = (base + 1e-3 * torch.randn(24, 48, generator=gen)).to(device, dtype)
    labels = (torch.arange(24) % 4).to(device)
    _check(f, labels, 0.01, backend=backend, device=device)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_zero_rows_gradient(device, backend):
    """A zero row has cosines 0 and gets d f_n / 1e-12, as autograd through F.normalize gives."""
    f = _features(18, 20, torch.float32, device, 8)
    f[[2, 11]] = 0
    labels = (torch.arange(18) % 5).to(device)
    _check(f, labels, 0.1, backend=backend, device=device)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_grad_output_scales_the_gradient(device, backend):
    f = _features(17, 20, torch.float32, device, 9)
    labels = (torch.arange(17) % 3).to(device)
    _check(f, labels, 0.2, backend=backend, device=device, scale=-2.5)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_deterministic(device, backend):
    f = _features(45, 36, torch.float32, device, 10)
    labels = (torch.arange(45) % 7).to(device)
    runs = [_value_and_grad(lambda x, y: ntkcl_fast.ntkcl_contrastive(x, y, temperature=0.05, backend=backend),
                            f, labels) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("device,backend", PAIRS)
def test_singletons_beside_pairs(device, backend):
    """Rows without a positive partner still enter the row term; one pair is enough for a finite value."""
    f = _features(20, 16, torch.float32, device, 11)
    labels = torch.arange(20, device=device)
    labels[7] = labels[13]
    _check(f, labels, 0.1, backend=backend, device=device)
