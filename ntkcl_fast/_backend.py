"""Which backends exist on this machine, and which one an op runs on.

The compiled extension is optional: when it is missing (or was built without CUDA)
the package still works through the reference backend, and every function here can
say why a faster backend is not there.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")

try:  # the extension registers the ntkcl_fast:: ops as a side effect of the import
    _C = importlib.import_module("ntkcl_fast._C")
    _C_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only on installs without a build
    _C = None
    _C_ERROR = f"{exc}"

# backend="auto" order per device type, fastest first. CPU: bench/results/cpu.json (the
# compiled CPU kernels beat the reference on every row). CUDA: the compiled kernels are
# preferred over Triton because they run mixed dtypes in one launch and read the decay from
# device memory; the GPU rows of bench/results/ are the place to revisit this order.
AUTO_ORDER = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ntkcl_fast::{op}", dispatch_key)
    except RuntimeError:  # an extension built before `op` existed has no schema for it
        return False


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device_type: str, op: str = "ema_update_") -> str | None:
    """None when `backend` can run `op` on tensors of `device_type`, else why not and how to fix."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got {device_type} tensors"
        if _C is None:
            return f"the compiled extension ntkcl_fast._C is not importable ({_C_ERROR}); reinstall with `pip install --no-build-isolation .`"
        return None if _has_kernel(op, "CPU") else f"ntkcl_fast._C has no CPU kernel for {op}"
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {device_type} tensors"
        if _C is None:
            return f"the compiled extension ntkcl_fast._C is not importable ({_C_ERROR}); reinstall with `pip install --no-build-isolation .`"
        if not _has_kernel(op, "CUDA"):
            return ("ntkcl_fast._C was built without CUDA kernels; rebuild with a CUDA build of torch "
                    "and nvcc on PATH, or force it with NTKCL_FORCE_CUDA=1")
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpret():
            return None
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device_type} tensors"
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


# The Triton kernels are registered as ops of their own namespace, with the schema of the
# extension's op of the same name, so every backend is one `torch.ops` call that torch.compile
# keeps opaque, and the op machinery bumps version counters of what it writes.
TRITON_NAMESPACE = "ntkcl_fast_triton"


def kernel(backend: str, op: str):
    """The `torch.ops` entry of `op` for a resolved compiled backend ('cpu', 'cuda' or 'triton')."""
    return getattr(getattr(torch.ops, TRITON_NAMESPACE if backend == "triton" else "ntkcl_fast"), op)


def dense(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kernels take dense tensors: strided ones become contiguous copies (others stay as they are)."""
    return [t.contiguous() for t in tensors]


def write_back(originals: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    """After an in-place kernel ran on `dense(originals)`, copy results into the strided originals."""
    for o, w in zip(originals, work):
        if w is not o:
            o.copy_(w)


def constant_under_compile(fn):
    """What `torch.compiler.assume_constant_result` does (torch/_dynamo/decorators.py: it marks the
    function), without importing torch._dynamo with the package: that import costs ~150 MB of
    memory and most of a second, which the merge CLI and plain eager users never need.
    tests/test_backend.py checks that torch still marks functions this way."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend name to run `op` on for tensors on `device`.

    torch.compile runs this once while tracing and keeps the name as a constant, so a compiled
    graph calls the chosen kernel directly; eager calls hit a cache (what is installed does not
    change while the process runs).
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    return _resolve_cached(backend, device.type, op)


@functools.lru_cache(maxsize=None)
def _resolve_cached(backend: str, device_type: str, op: str) -> str:
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            if unavailable_reason(name, device_type, op) is None:
                return name
        return "torch"
    reason = unavailable_reason(backend, device_type, op)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def backends() -> dict[str, bool]:
    """What can run on this machine: {'torch', 'cpu', 'cuda', 'triton'} -> bool."""
    cuda_device = torch.cuda.is_available()
    return {
        "torch": True,
        "cpu": unavailable_reason("cpu", "cpu") is None,
        "cuda": cuda_device and unavailable_reason("cuda", "cuda") is None,
        "triton": unavailable_reason("triton", "cuda" if cuda_device else "cpu") is None,
    }


def info() -> dict[str, object]:
    """Build and runtime facts for `python -m ntkcl_fast info` and bug reports."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda_device = torch.cuda.is_available()
    reasons = {
        "cpu": unavailable_reason("cpu", "cpu"),
        "cuda": unavailable_reason("cuda", "cuda") if cuda_device else
        ("no CUDA device visible to torch" if _has_kernel("ema_update_", "CUDA")
         else unavailable_reason("cuda", "cuda")),
        "triton": unavailable_reason("triton", "cuda" if cuda_device else "cpu"),
    }
    return {
        "backends": backends(),
        "why_missing": {k: v for k, v in reasons.items() if v},
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "device": torch.cuda.get_device_name() if cuda_device else "cpu",
        "extension": getattr(_C, "__file__", None),
        "extension_built_with_cuda": bool(getattr(_C, "with_cuda", False)),
        "extension_cuda_archs": getattr(_C, "cuda_archs", None),
        "extension_torch": getattr(_C, "built_with_torch", None),
    }
