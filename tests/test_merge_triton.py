"""merge_tensors' Triton kernel against the CPU kernel, bit for bit (API.md: the output is
bit-identical for every backend and device), on every method, rescale and dtype; the radix
select's ties and NaN, the l1 norms over several chunks, auto's choice on CUDA, opcheck, and the
compile check of every kernel variant. Without a GPU the kernels run in Triton's interpreter,
and the tests check that they did (launches counted), so no fallback can pass for them."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ntkcl_fast import _backend
from ntkcl_fast.merge import merge_tensors

from .test_merge_tensors import tied_magnitudes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CASES = [("linear", None), ("task_arithmetic", None), ("ties", None)] + [
    (m, r) for m in ("dare_linear", "dare_ties") for r in ("density", "l1", "none")]

pytestmark = [
    pytest.mark.skipif(_backend.unavailable_reason("triton", DEVICE, "merge_tensors") is not None,
                       reason=str(_backend.unavailable_reason("triton", DEVICE, "merge_tensors"))),
    pytest.mark.skipif(_backend.unavailable_reason("cpu", "cpu", "merge_tensors") is not None,
                       reason="no compiled CPU kernel to compare with"),
]


@pytest.fixture
def launches(monkeypatch):
    """Counts the launches of each kernel of ntkcl_fast.triton.merge."""
    from ntkcl_fast.triton import merge as tm
    counts = {}

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            counts[self.name] = counts.get(self.name, 0) + 1
            return self.kernel[grid]

    for name in ("_merge_kernel", "_histogram_kernel", "_tie_count_kernel", "_l1_kernel"):
        monkeypatch.setattr(tm, name, Counted(name, getattr(tm, name)))
    return counts


def _inputs(n_models, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_models)]
    return base.to(dtype), [m.to(dtype) for m in models]


def _same_bits(got, want, what=""):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), what
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)), \
        f"{what}: {(got != want).sum().item()} differ, max {(got.double() - want.double()).abs().max().item()}"


def _both(base, models, **kw):
    """(Triton on DEVICE, CPU kernel) of one call."""
    got = merge_tensors(None if base is None else base.to(DEVICE), [m.to(DEVICE) for m in models], backend="triton",
                        **kw)
    return got, merge_tensors(base, models, backend="cpu", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,rescale", CASES)
def test_triton_matches_cpu_bit_for_bit(method, rescale, dtype, launches):
    # odd sizes; 1..4 models; densities in (0, 1), 1 and 0; a key that wraps around 2**64
    runs = ((1, (37, 53), False), (3, (37, 53), False), (3, (37, 53), True), (4, (3, 5, 7), True))
    for n_models, shape, normalize in runs:
        base, models = _inputs(n_models, shape, dtype, seed=n_models)
        kw = dict(method=method, weight=[0.9, -0.3, 1.7, 0.5][:n_models],
                  density=[0.55, 0.2, 1.0, 0.0][:n_models], lam=0.8, seed=3, key=2**64 - 2)
        if rescale is not None:
            kw["rescale"] = rescale
        got, want = _both(None if method == "linear" else base, models, normalize=normalize, **kw)
        _same_bits(got, want, f"{n_models} models {shape} normalize={normalize}")
    assert launches["_merge_kernel"] == len(runs)
    if method == "ties":
        assert launches["_histogram_kernel"] == (4 if dtype == torch.float64 else 2) * len(runs)
    if rescale == "l1":
        assert launches["_l1_kernel"] == len(runs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_magnitude_ties_nan_and_inf(dtype, launches):
    # few distinct magnitudes, NaN and inf: the threshold sits inside long runs of ties that
    # straddle blocks and are split by index
    base, models = tied_magnitudes(3001, dtype)
    for density in (0.0, 0.0001, 0.3, 0.61, 0.999, 1.0):
        kw = dict(method="ties", weight=[1.0, 0.5, -2.0], density=density, normalize=True)
        _same_bits(*_both(base, models, **kw), f"density {density}")
    assert launches["_tie_count_kernel"] >= 3  # 0.3, 0.61, 0.999 split ties


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_l1_rescale_with_a_nonfinite_norm(bad, launches):
    # a NaN norm is not below 1e-7: that model scales by NaN (as mergekit); inf / inf is NaN
    base, models = _inputs(2, (37, 53), torch.float32)
    models[0][3, 4] = bad
    models[1][0, 1] = float("inf")
    kw = dict(method="dare_linear", rescale="l1", weight=[0.9, 0.4], density=[0.5, 0.7], seed=3, key=5)
    _same_bits(*_both(base, models, **kw))
    assert launches["_l1_kernel"] == 1


@pytest.mark.parametrize("method,rescale", [("ties", None), ("dare_ties", "l1")])
def test_triton_over_several_chunks(method, rescale, launches):
    # 3 chunks of the CPU kernel's l1 summation plan; magnitudes quantized so ties straddle blocks
    g = torch.Generator().manual_seed(1)
    n = 2 * 16384 + 1001
    base = torch.randn(n, generator=g)
    models = [base + (torch.randn(n, generator=g) * 8).round() / 64 for _ in range(2)]
    kw = dict(method=method, weight=[0.5, 1.0], density=[0.4, 0.7], seed=9, key=4)
    if rescale:
        kw["rescale"] = rescale
    _same_bits(*_both(base, models, **kw))
    assert launches["_merge_kernel"] == 1


def test_auto_on_cuda_takes_triton_unless_a_cuda_kernel_exists():
    want = "cuda" if _backend._has_kernel("merge_tensors", "CUDA") else "triton"
    assert _backend.resolve("auto", torch.device("cuda"), "merge_tensors") == want


def test_triton_op_passes_opcheck():
    base, models = _inputs(2, (5, 7), torch.float32)
    args = (base.to(DEVICE), [m.to(DEVICE) for m in models], "dare_ties", [0.6, 0.4], [0.5, 0.8], 0.9, True, "l1", 1, 2)
    torch.library.opcheck(torch.ops.ntkcl_fast_triton.merge_tensors.default, args)


def test_triton_op_rejects_bad_arguments():
    op = torch.ops.ntkcl_fast_triton.merge_tensors
    base, models = _inputs(2, (5,), torch.float32)
    base, models = base.to(DEVICE), [m.to(DEVICE) for m in models]
    bad = [(ValueError, "method", (base, models, "slerp", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)),
           (ValueError, "rescale", (base, models, "dare_ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "l2", 0, 0)),
           (ValueError, "densities\\[1\\]", (base, models, "ties", [1.0, 1.0], [1.0, 1.5], 1.0, True, "none", 0, 0)),
           (ValueError, "weights\\[0\\]", (base, models, "ties", [math.nan, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)),
           (ValueError, "models\\[1\\]", (base, [models[0], models[1][:4]], "ties", [1.0, 1.0], [1.0, 1.0], 1.0, True,
                                        "none", 0, 0)),
           (ValueError, "contiguous", (base, [models[0], torch.randn(10, device=DEVICE)[::2]], "ties", [1.0, 1.0],
                                       [1.0, 1.0], 1.0, True, "none", 0, 0)),
           (TypeError, "models\\[0\\]", (base, [models[0].double(), models[1]], "ties", [1.0, 1.0], [1.0, 1.0], 1.0,
                                       True, "none", 0, 0)),
           (ValueError, "base", (None, models, "ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)),
           (ValueError, "weights", (base, models, "ties", [1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)),
           (ValueError, "lam", (base, models, "ties", [1.0, 1.0], [1.0, 1.0], math.inf, True, "none", 0, 0))]
    for error, match, args in bad:
        with pytest.raises(error, match=match):
            op(*args)


def test_merge_triton_kernels_compile_for_sm80_and_sm90():
    """The interpreter does not type-check kernels, nor round as the GPU does: compile every
    variant to PTX and check it has no float FMA and no inexact division."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "compile_triton_merge.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
