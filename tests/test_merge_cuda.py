"""merge_tensors' CUDA kernel (csrc/cuda/merge.cu) against the CPU kernel and the Triton kernel,
bit for bit (API.md: the output is bit-identical for every backend and device): every method,
rescale and dtype, odd sizes, densities 0 / 0.3 / 1, model counts on both sides of the number of
terms a thread keeps in registers (8 for fp32 math, 4 for fp64), split ties with NaN and inf, l1
norms over several chunks, opcheck and the argument checks of the CUDA op; and, with nvcc alone,
that the kernels' PTX has no floating point FMA and no inexact division."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ntkcl_fast import _backend
from ntkcl_fast.merge import merge_tensors

from .test_merge_tensors import tied_magnitudes
from .test_merge_triton import CASES, DTYPES, _inputs, _same_bits


def _gpu(test):
    """Runs `test` only where the CUDA kernel can run and the CPU kernel is there to compare with."""
    for mark in (pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
                 pytest.mark.skipif(_backend.unavailable_reason("cuda", "cuda", "merge_tensors") is not None,
                                    reason=str(_backend.unavailable_reason("cuda", "cuda", "merge_tensors"))),
                 pytest.mark.skipif(_backend.unavailable_reason("cpu", "cpu", "merge_tensors") is not None,
                                    reason="no compiled CPU kernel to compare with")):
        test = mark(test)
    return test


SIZES = (1, 255, 1025, 70001)
MODEL_COUNTS = (1, 2, 3, 5, 10)  # 5 and 10 exceed the fp64 bound, 10 the fp32 one
DENSITIES = (0.3, 1.0, 0.0)
WEIGHTS = (0.9, -0.3, 1.7, 0.5, -1.1)


def _cuda_and_cpu(base, models, **kw):
    got = merge_tensors(None if base is None else base.cuda(), [m.cuda() for m in models], backend="cuda", **kw)
    return got, merge_tensors(base, models, backend="cpu", **kw)


def _kwargs(method, rescale, n_models, **extra):
    kw = dict(method=method, weight=[WEIGHTS[i % len(WEIGHTS)] for i in range(n_models)],
              density=[DENSITIES[i % len(DENSITIES)] for i in range(n_models)], lam=0.8, seed=3, key=2**64 - 2)
    if rescale is not None:
        kw["rescale"] = rescale
    return kw | extra


@_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,rescale", CASES)
def test_cuda_matches_cpu_bit_for_bit(method, rescale, dtype):
    for size in SIZES:
        for n_models in MODEL_COUNTS:
            base, models = _inputs(n_models, (size,), dtype, seed=size + n_models)
            for normalize in (False, True):
                kw = _kwargs(method, rescale, n_models, normalize=normalize)
                got, want = _cuda_and_cpu(None if method == "linear" else base, models, **kw)
                _same_bits(got, want, f"size {size}, {n_models} models, normalize={normalize}")


@_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_magnitude_ties_nan_and_inf(dtype):
    # few distinct magnitudes, NaN and inf: thresholds inside long runs of ties that straddle
    # blocks and are split by index
    for n in (3001, 70001):
        base, models = tied_magnitudes(n, dtype)
        for density in (0.0, 0.0001, 0.3, 0.61, 0.999, 1.0):
            kw = dict(method="ties", weight=[1.0, 0.5, -2.0], density=density, normalize=True)
            _same_bits(*_cuda_and_cpu(base, models, **kw), f"n {n}, density {density}")


@_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,rescale", [("ties", None), ("dare_ties", "l1"), ("dare_linear", "l1")])
def test_cuda_over_several_chunks(method, rescale, dtype):
    # 3 chunks of the CPU kernel's l1 summation plan; magnitudes quantized so ties straddle blocks
    g = torch.Generator().manual_seed(1)
    n = 2 * 16384 + 1001
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.double() + (torch.randn(n, generator=g, dtype=torch.float64) * 8).round() / 64).to(dtype)
              for _ in range(2)]
    kw = dict(method=method, weight=[0.5, 1.0], density=[0.4, 0.7], seed=9, key=4)
    if rescale:
        kw["rescale"] = rescale
    _same_bits(*_cuda_and_cpu(base, models, **kw))


@_gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cuda_l1_rescale_with_a_nonfinite_norm(bad):
    # a NaN norm is not below 1e-7: that model scales by NaN (as mergekit); inf / inf is NaN
    base, models = _inputs(2, (37, 53), torch.float32)
    models[0][3, 4] = bad
    models[1][0, 1] = float("inf")
    kw = dict(method="dare_linear", rescale="l1", weight=[0.9, 0.4], density=[0.5, 0.7], seed=3, key=5)
    _same_bits(*_cuda_and_cpu(base, models, **kw))


@_gpu
@pytest.mark.skipif(_backend.unavailable_reason("triton", "cuda", "merge_tensors") is not None,
                    reason=str(_backend.unavailable_reason("triton", "cuda", "merge_tensors")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method,rescale", CASES)
def test_cuda_matches_triton_bit_for_bit(method, rescale, dtype):
    for size in (255, 70001):
        for n_models in (3, 10):
            base, models = _inputs(n_models, (size,), dtype, seed=size + n_models)
            base = None if method == "linear" else base.cuda()
            models = [m.cuda() for m in models]
            kw = _kwargs(method, rescale, n_models, normalize=True)
            got = merge_tensors(base, models, backend="cuda", **kw)
            _same_bits(got, merge_tensors(base, models, backend="triton", **kw).cpu(), f"{size}, {n_models} models")


@_gpu
def test_auto_on_cuda_takes_the_cuda_kernel():
    assert _backend.resolve("auto", torch.device("cuda"), "merge_tensors") == "cuda"


@_gpu
def test_cuda_empty_and_strided_inputs():
    base, models = _inputs(2, (0, 5), torch.float32)
    got = merge_tensors(base.cuda(), [m.cuda() for m in models], method="ties", density=0.5, backend="cuda")
    assert got.shape == (0, 5) and got.device.type == "cuda"
    base, models = _inputs(2, (6, 9), torch.bfloat16)
    strided = [m.t() for m in models]  # the API makes them contiguous before the op
    kw = dict(method="dare_ties", weight=[0.7, 0.6], density=[0.5, 0.8], seed=2, key=1)
    got = merge_tensors(base.t().cuda(), [m.cuda() for m in strided], backend="cuda", **kw)
    _same_bits(got.contiguous(), merge_tensors(base.t(), strided, backend="cpu", **kw))


@_gpu
def test_cuda_op_passes_opcheck():
    base, models = _inputs(2, (5, 7), torch.float32)
    for method, rescale in (("dare_ties", "l1"), ("ties", "none")):
        args = (base.cuda(), [m.cuda() for m in models], method, [0.6, 0.4], [0.5, 0.8], 0.9, True, rescale, 1, 2)
        torch.library.opcheck(torch.ops.ntkcl_fast.merge_tensors.default, args)


@_gpu
def test_cuda_op_rejects_bad_arguments():
    op = torch.ops.ntkcl_fast.merge_tensors
    base, models = _inputs(2, (5,), torch.float32)
    base, models = base.cuda(), [m.cuda() for m in models]
    bad = [(ValueError, "method", (base, models, "slerp", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0)),
           (ValueError, "rescale", (base, models, "dare_ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "l2", 0, 0)),
           (ValueError, "densities\\[1\\]", (base, models, "ties", [1.0, 1.0], [1.0, 1.5], 1.0, True, "none", 0, 0)),
           (ValueError, "models\\[1\\]", (base, [models[0], models[1].cpu()], "ties", [1.0, 1.0], [1.0, 1.0], 1.0,
                                        True, "none", 0, 0)),
           (TypeError, "models\\[0\\]", (base, [models[0].double(), models[1]], "ties", [1.0, 1.0], [1.0, 1.0], 1.0,
                                       True, "none", 0, 0)),
           (ValueError, "base", (None, models, "ties", [1.0, 1.0], [1.0, 1.0], 1.0, True, "none", 0, 0))]
    for error, match, args in bad:
        with pytest.raises(error, match=match):
            op(*args)


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_cuda_merge_ptx_has_no_fma_and_no_inexact_division(arch, tmp_path):
    """Compiled without --fmad=false (nvcc's default contracts a * b + c): the kernels round as
    the CPU kernel does because every product is __fmul_rn / __dmul_rn and every quotient
    __fdiv_rn / __ddiv_rn, not because of a build flag."""
    from torch.utils.cpp_extension import include_paths
    source = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "merge.cu"
    ptx = tmp_path / "merge.ptx"
    cmd = ["nvcc", *(f"-I{p}" for p in include_paths(device_type="cuda")), "-std=c++20", "-O3",
           "--expt-relaxed-constexpr", f"-arch={arch}", "-ptx", str(source), "-o", str(ptx)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    text = ptx.read_text()
    assert len(re.findall(r"\.entry \S*merge_kernel", text)) == 8  # 4 dtypes, with and without the election
    assert not re.findall(r"\bfma\.rn\.f(32|64)|\bmad\.(rn\.)?f(32|64)", text)
    assert not re.findall(r"\bdiv\.(approx|full)\.f32|\brcp\.approx", text)
    assert re.findall(r"\bdiv\.rn\.f32", text) and re.findall(r"\bdiv\.rn\.f64", text)
