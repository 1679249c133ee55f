"""The orthogonality API around the kernels: gradcheck, modules, empty and bad input, backend
choice, fp64 on the compiled backends, and the Triton kernels' compile check."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend, ortho
from ntkcl_fast.reference import ortho as reference

from ._ortho_helpers import pairs


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


@pytest.fixture
def fresh_resolution():
    """Backend resolution is cached per (backend, device type, op): start and end with an empty cache."""
    _backend._resolve_cached.cache_clear()
    yield
    _backend._resolve_cached.cache_clear()


def test_auto_takes_the_one_launch_triton_lists_on_cuda(monkeypatch, fresh_resolution):
    """On CUDA, "auto" runs gram / cross on Triton (one launch per list) unless a tensor is fp64;
    the other ops keep the compiled-first order."""
    monkeypatch.setattr(_backend, "unavailable_reason", lambda *args, **kwargs: None)
    cuda = torch.device("cuda")
    for op in ("gram_orthogonality", "cross_orthogonality"):
        assert ortho._resolve("auto", cuda, op, [torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)]) == "triton"
        assert ortho._resolve("auto", cuda, op, [torch.zeros(1, dtype=torch.float64)]) == "cuda"
        assert ortho._resolve("cuda", cuda, op, [torch.zeros(1)]) == "cuda"
    assert ortho._resolve("auto", cuda, "feature_orthogonality") == "cuda"
    assert ortho._resolve("auto", torch.device("cpu"), "gram_orthogonality", [torch.zeros(1)]) == "cpu"


@pytest.mark.parametrize("device,backend", [p for p in pairs("feature_orthogonality") if p.values[1] == "triton"])
def test_triton_rejects_fp64(device, backend):
    f = torch.randn(3, 4, dtype=torch.float64, device=device)
    kw = {"backend": backend}
    calls = [lambda: ntkcl_fast.feature_orthogonality(f, f, **kw),
             lambda: ntkcl_fast.projection_residual(f, f.T[:, :2], **kw),
             lambda: ntkcl_fast.gram_orthogonality([f.float(), f], **kw),
             lambda: ntkcl_fast.cross_orthogonality([f], [f.float()], **kw),
             lambda: ntkcl_fast.ntkcl_contrastive(f, torch.zeros(3, dtype=torch.long, device=device), **kw)]
    for call in calls:
        with pytest.raises(RuntimeError, match="fp64"):
            call()



@pytest.mark.parametrize("device,backend",
                         [p for p in pairs("feature_orthogonality") if p.values[1] in ("cpu", "cuda")])
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


def _compiled_ops():
    if _backend.unavailable_reason("cpu", "cpu", "feature_orthogonality"):
        pytest.skip("needs the compiled CPU backend")
    return torch.ops.ntkcl_fast


@pytest.mark.parametrize("call,match,exc", [
    (lambda ops: ops.feature_orthogonality(torch.randn(3), torch.randn(2, 3), True, True), "features", ValueError),
    (lambda ops: ops.feature_orthogonality(torch.randn(3, 4), torch.randn(2, 5), True, True), "prototypes",
     ValueError),
    (lambda ops: ops.projection_residual(torch.randn(3, 4), torch.randn(5, 2), True, False), "basis", ValueError),
    (lambda ops: ops.gram_orthogonality([torch.randn(3, 4), torch.ones(2, 4, dtype=torch.int32)], True),
     r"weights\[1\]", TypeError),
    (lambda ops: ops.gram_orthogonality_backward(torch.tensor(1.0), torch.zeros(8), [torch.randn(3, 4)]),
     "d_gram", ValueError),
    (lambda ops: ops.cross_orthogonality([torch.randn(3, 4)], [torch.randn(2, 5)], True), r"old\[0\] and new\[0\]",
     ValueError),
    (lambda ops: ops.ntkcl_contrastive(torch.randn(3, 4), torch.zeros(4, dtype=torch.long), 0.1), "labels",
     ValueError),
])
def test_compiled_ops_raise_value_and_type_errors(call, match, exc):
    """The C++ ops check their own arguments too (they are callable without the public wrapper)."""
    with pytest.raises(exc, match=match):
        call(_compiled_ops())
