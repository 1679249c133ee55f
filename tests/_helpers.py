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
