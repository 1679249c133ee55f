"""Shared test helpers: which (device, backend) pairs to run, and the error budget."""
from __future__ import annotations

import pytest
import torch

from ntkcl_fast import _backend


def device_backends(op: str) -> list:
    """Every (device, backend) pair; pairs this machine cannot run are skipped, never passed."""
    pairs = []
    for device in ("cpu", "cuda"):
        for backend in ("torch", "cpu", "cuda", "triton"):
            if backend == "cpu" and device != "cpu" or backend == "cuda" and device != "cuda":
                continue
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            elif backend == "triton" and _backend.unavailable_reason("triton", device, op):
                marks.append(pytest.mark.skip(reason=_backend.unavailable_reason("triton", device, op)))
            pairs.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return pairs


def interpreted_triton(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def assert_within_budget(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, *, extra_ulps: int = 0,
                         what: str = "") -> None:
    """Error of `out` vs the fp64 oracle <= 2x the error of eager PyTorch in the same dtype + a floor.

    The floor is one ulp of the output dtype at the oracle's magnitude (plus `extra_ulps`, e.g. for
    Triton's interpreter, which rounds fp32 -> bf16 by truncation).
    """
    if out.numel() == 0:
        return
    ref64 = ref64.double().cpu()
    err = (out.double().cpu() - ref64).abs().max().item()
    eager_err = (eager.double().cpu() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * max(1.0, ref64.abs().max().item())
    budget = 2 * eager_err + (1 + extra_ulps) * ulp
    assert err <= budget, f"{what}: max error {err:.3e} > budget {budget:.3e} (eager error {eager_err:.3e})"


def snapshot(tensors) -> list[torch.Tensor]:
    """Copies of `tensors` (and of their .grad), to show later that nothing was written."""
    out = []
    for t in tensors:
        out.append(t.detach().clone(memory_format=torch.contiguous_format))
        if t.grad is not None:
            out.append(t.grad.detach().clone(memory_format=torch.contiguous_format))
    return out


def assert_unchanged(tensors, before: list[torch.Tensor]) -> None:
    """Every tensor (and .grad) still equals its snapshot, NaN-aware and bit for bit."""
    after = snapshot(tensors)
    assert len(after) == len(before), "a .grad appeared or vanished"
    for i, (a, b) in enumerate(zip(after, before)):
        assert torch.equal(a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
                           b.view(-1).view(torch.uint8) if b.is_floating_point() else b), f"tensor {i} changed"


def assert_bumps_versions(fn, written) -> None:
    """`fn()` bumps the autograd version counter of every tensor in `written`."""
    before = [t._version for t in written]
    fn()
    for i, (t, v) in enumerate(zip(written, before)):
        assert t._version > v, f"written tensor {i}: version counter not bumped"


def compiled(fn, backend: str = "aot_eager"):
    """`fn` under torch.compile(fullgraph=True) with a fresh cache (a graph break fails the test).

    "aot_eager" runs everything the op contract rests on (dynamo's trace, the fake kernels,
    functionalization of the in-place ops, AOT autograd with the registered backward) without
    inductor's C++ code generation, which costs seconds per graph on a CPU; pass
    backend="inductor" for the end-to-end check of a hot path.
    """
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)


def assert_within_budget_of_sum(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, terms64: torch.Tensor, *,
                                what: str = "") -> None:
    """`assert_within_budget` for a 0-d value that is a sum of terms which cancel (`terms64`: the terms
    in fp64, or any tensor whose absolute sum is theirs).

    The floor is one ulp at sum(|terms|) instead of at |value|: each term carries a rounding of
    its own size, so u * sum(|terms|) is the first-order error bound of any evaluation in the output
    dtype, and when the terms cancel it is far above an ulp of the value. Eager's error is one sample
    below that bound, which rounding order (thread count, GEMM blocking) moves by several times.
    """
    ref64 = ref64.double().cpu()
    err = (out.double().cpu() - ref64).abs().item()
    eager_err = (eager.double().cpu() - ref64).abs().item()
    ulp = torch.finfo(out.dtype).eps * max(1.0, terms64.double().abs().sum().item())
    budget = 2 * eager_err + ulp
    assert err <= budget, f"{what}: error {err:.3e} > budget {budget:.3e} (eager error {eager_err:.3e})"
