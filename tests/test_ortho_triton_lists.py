"""Triton gram_orthogonality / cross_orthogonality over lists: one launch per dtype group and
stage, and the shapes the tiling has to get right (N = 1, N spanning several tiles, D not a
multiple of the block, r = 40 against s = 8, zeros of the l1 sign, D = 0)."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.reference import ortho as reference

from ._helpers import device_backends

PAIRS = [p for p in device_backends("gram_orthogonality") if p.values[1] == "triton"]


@pytest.fixture
def gram():
    from ntkcl_fast.triton import gram
    return gram


def _rand(gen, shape, device, dtype=torch.float32):
    return (torch.randn(shape, generator=gen) * shape[1] ** -0.5).to(device, dtype)


def _count_launches(monkeypatch, gram):
    """Launches per kernel name, counted where `kernel[grid](...)` calls `kernel.run`, plus the
    launch-table uploads (host-to-device copies)."""
    counts: dict[str, int] = {}
    for name in ("_gram_tiles_kernel", "_cross_tiles_kernel", "_grad_panels_kernel"):
        kernel = getattr(gram, name)

        def run(*args, _run=kernel.run, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
    upload = gram._Table.upload

    def counting_upload(self, device):
        counts["table uploads"] = counts.get("table uploads", 0) + 1
        return upload(self, device)
    monkeypatch.setattr(gram._Table, "upload", counting_upload)
    return counts


def _grads_64(fn, tensors, scale):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(leaves)
    train = [t for t in leaves if t.requires_grad]
    return out.detach(), torch.autograd.grad(out * scale, train)


def _assert_close(out, want, what):
    """Normwise: max error <= 1e-5 of the largest reference magnitude (fp32 math over D <= 300)."""
    err = (out.double().cpu() - want.double().cpu()).abs().max().item()
    bound = 1e-5 * max(want.abs().max().item(), 1e-30)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("device,backend", PAIRS)
def test_one_launch_per_stage_for_24_layers(device, backend, gram, monkeypatch):
    gen = torch.Generator().manual_seed(24)
    counts = _count_launches(monkeypatch, gram)

    ws = [_rand(gen, (8, 32), device).requires_grad_() for _ in range(24)]
    out = ntkcl_fast.gram_orthogonality(ws, backend=backend)
    assert counts == {"_gram_tiles_kernel": 1, "table uploads": 1}
    counts.clear()
    out.backward()
    # the backward starts from the forward's derivative buffer: no product tiles again
    assert counts == {"_grad_panels_kernel": 1, "table uploads": 1}
    assert all(w.grad is not None for w in ws)

    for frozen in (None, "old"):
        old = [_rand(gen, (8, 32), device).requires_grad_(frozen is None) for _ in range(24)]
        new = [_rand(gen, (8, 32), device).requires_grad_() for _ in range(24)]
        counts.clear()
        out = ntkcl_fast.cross_orthogonality(old, new, backend=backend)
        assert counts == {"_cross_tiles_kernel": 1, "table uploads": 1}
        counts.clear()
        out.backward()
        assert counts == {"_grad_panels_kernel": 1, "table uploads": 1}
        assert all(t.grad is not None for t in new)
        assert all((t.grad is not None) == (frozen is None) for t in old)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_one_launch_per_dtype_group(device, backend, gram, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    counts = _count_launches(monkeypatch, gram)
    dtypes = [torch.float32, torch.bfloat16] * 12
    ws = [_rand(gen, (4, 16), device, dt).requires_grad_() for dt in dtypes]
    ntkcl_fast.gram_orthogonality(ws, backend=backend).backward()
    assert counts == {"_gram_tiles_kernel": 2, "_grad_panels_kernel": 2, "table uploads": 2}

    # (old, new) dtype pairs: (fp32, fp16) and (bf16, fp16): two groups, each with mixed sides
    old = [_rand(gen, (4, 16), device, dt).requires_grad_() for dt in dtypes]
    new = [_rand(gen, (3, 16), device, torch.float16).requires_grad_() for _ in dtypes]
    counts.clear()
    ntkcl_fast.cross_orthogonality(old, new, backend=backend).backward()
    assert counts == {"_cross_tiles_kernel": 2, "_grad_panels_kernel": 2, "table uploads": 2}


GRAM_EDGES = {
    "N=1": [(1, 200)],
    "N=17,40 (several tiles, mirror writes), D=300 (3 steps, ragged)": [(17, 300), (40, 129)],
    "N=100, 28 tiles on and below the diagonal": [(100, 20)],
    "ragged D in one list": [(5, 3), (16, 257), (1, 1), (33, 128)],
}


@pytest.mark.parametrize("case", list(GRAM_EDGES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("device,backend", PAIRS)
def test_gram_edge_shapes(device, backend, case, reduction):
    gen = torch.Generator().manual_seed(3)
    ws = [_rand(gen, s, device).requires_grad_() for s in GRAM_EDGES[case]]
    out = ntkcl_fast.gram_orthogonality(ws, reduction=reduction, backend=backend)
    want, want_g = _grads_64(lambda w: reference.gram_orthogonality(w, reduction), ws, -2.5)
    _assert_close(out, want, f"{case} value")
    grads = torch.autograd.grad(out * -2.5, ws)  # grad_output != 1 and negative
    for i, (g, w) in enumerate(zip(grads, want_g)):
        _assert_close(g, w, f"{case} grad {i}")
    again = ntkcl_fast.gram_orthogonality(ws, reduction=reduction, backend=backend)
    assert torch.equal(out, again), "the value is not deterministic"


CROSS_EDGES = {
    "r=40 vs s=8, D=300": ([(40, 300)], [(8, 300)]),
    "s=40 vs r=8, 1 x 1, ragged D": ([(8, 129), (1, 1), (17, 64)], [(40, 129), (1, 1), (33, 64)]),
}


@pytest.mark.parametrize("frozen", [None, "old", "new"])
@pytest.mark.parametrize("case", list(CROSS_EDGES))
@pytest.mark.parametrize("norm", ["l1", "fro2"])
@pytest.mark.parametrize("device,backend", PAIRS)
def test_cross_edge_shapes(device, backend, norm, case, frozen):
    gen = torch.Generator().manual_seed(5)
    old_s, new_s = CROSS_EDGES[case]
    old = [_rand(gen, s, device).requires_grad_(frozen != "old") for s in old_s]
    new = [_rand(gen, s, device).requires_grad_(frozen != "new") for s in new_s]
    n = len(old)
    out = ntkcl_fast.cross_orthogonality(old, new, norm=norm, backend=backend)
    want, want_g = _grads_64(lambda t: reference.cross_orthogonality(t[:n], t[n:], norm), old + new, 0.75)
    _assert_close(out, want, f"{case} value")
    train = [t for t in old + new if t.requires_grad]
    for i, (g, w) in enumerate(zip(torch.autograd.grad(out * 0.75, train), want_g)):
        _assert_close(g, w, f"{case} grad {i}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_cross_l1_sign_of_zero_is_zero(device, backend):
    """Exactly orthogonal rows: P = 0, and |P|'s gradient there is 0 (torch.abs), not +-1."""
    eye = torch.eye(4, 20, device=device)
    old, new = eye[:2].clone().requires_grad_(), eye[2:].clone().requires_grad_()
    out = ntkcl_fast.cross_orthogonality([old], [new], backend=backend)
    out.backward()
    assert out.item() == 0
    assert torch.equal(old.grad, torch.zeros_like(old)) and torch.equal(new.grad, torch.zeros_like(new))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_gram_zero_width(device, backend):
    """W [3, 0]: W W^T - I = -I, an empty gradient, next to an ordinary layer."""
    gen = torch.Generator().manual_seed(9)
    ws = [torch.zeros(3, 0, device=device, requires_grad=True), _rand(gen, (2, 5), device).requires_grad_()]
    out = ntkcl_fast.gram_orthogonality(ws, reduction="sum", backend=backend)
    want, want_g = _grads_64(lambda w: reference.gram_orthogonality(w, "sum"), ws, 1.0)
    _assert_close(out, want, "value")
    out.backward()
    assert ws[0].grad.shape == (3, 0)
    _assert_close(ws[1].grad, want_g[1], "grad")
