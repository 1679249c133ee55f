"""`merge_tensors`: mergekit's merge methods on one tensor (API.md, "Model merging"), with every
argument checked before anything runs."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _backend, _validate, distributed
from ..random import as_i64, as_u64
from ..reference import merge as reference

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
RANDOM = ("dare_linear", "dare_ties")
RESCALES = ("density", "l1", "none")


def _merge_fake(base, models, method, weights, densities, lam, normalize, rescale, seed, key, offset=0):
    like = base if base is not None else models[0]
    torch._check(len(models) == len(weights) == len(densities), lambda: "one weight and density per model")
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _merge_into_fake(out, base, models, method, weights, densities, lam, normalize, rescale, seed, key, offset=0):
    return None


if _backend._C is not None:
    torch.library.register_fake("ntkcl_fast::merge_tensors")(_merge_fake)
    torch.library.register_fake("ntkcl_fast::merge_tensors_into_")(_merge_into_fake)


def _check_op_args(base, models, method, weights, densities, lam, rescale) -> None:
    """What csrc/merge_checks.h checks for the compiled op, with its messages: the Triton op reads
    raw pointers, so a direct torch.ops call must not get past a bad argument."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {', '.join(RESCALES)}, got '{rescale}'")
    if not models:
        raise ValueError("models must be a non-empty list of tensors")
    if base is None and method != "linear":
        raise ValueError("base may be None only for method linear")
    like, label = (base, "base") if base is not None else (models[0], "models[0]")
    if like.dtype not in _validate.FLOATING:
        raise TypeError(f"{label} must be a floating tensor (fp16, bf16, fp32, fp64), got {like.dtype}")
    if not like.is_contiguous():
        raise ValueError(f"{label} must be contiguous")
    for i, m in enumerate(models):
        if m.dtype != like.dtype:
            raise TypeError(f"models[{i}] must have the dtype of {label}")
        if m.shape != like.shape:
            raise ValueError(f"models[{i}] must have the shape of {label}")
        if m.device != like.device:
            raise ValueError(f"models[{i}] must be on the device of {label}")
        if not m.is_contiguous():
            raise ValueError(f"models[{i}] must be contiguous")
    if len(weights) != len(models) or len(densities) != len(models):
        raise ValueError(f"weights and densities must have one value per model ({len(models)}), got "
                         f"{len(weights)} and {len(densities)}")
    for i, (w, r) in enumerate(zip(weights, densities)):
        if not math.isfinite(w):
            raise ValueError(f"weights[{i}] must be finite")
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"densities[{i}] must be in [0, 1]")
    if not math.isfinite(lam):
        raise ValueError("lam must be finite")


# the Triton kernel as an op of the extension's schema (ntkcl_fast/_backend.py, TRITON_NAMESPACE)
@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::merge_tensors", mutates_args=())
def _triton_merge_tensors(base: torch.Tensor | None, models: list[torch.Tensor], method: str, weights: list[float],
                          densities: list[float], lam: float, normalize: bool, rescale: str, seed: int,
                          key: int, offset: int = 0) -> torch.Tensor:
    _check_op_args(base, models, method, weights, densities, lam, rescale)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    from ..triton.merge import merge_tensors as launch
    return launch(base, models, method, weights, densities, lam, normalize, rescale, seed, key, offset)


_triton_merge_tensors.register_fake(_merge_fake)


def _per_model(value, n: int, name: str, *, unit: bool = False) -> list[float]:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} must be a float or one float per model ({n}), got {len(values)} values")
    out = []
    for i, v in enumerate(values):
        label = f"{name}[{i}]" if isinstance(value, Sequence) else name
        v = _validate.finite_float(v, label)
        if unit and not 0.0 <= v <= 1.0:
            raise ValueError(f"{label} must be in [0, 1], got {v}")
        out.append(v)
    return out


def _tensors(base, models) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if isinstance(models, torch.Tensor) or not isinstance(models, Sequence) or len(models) == 0:
        raise TypeError("models must be a non-empty sequence of tensors")
    like = base if base is not None else models[0]
    label = "base" if base is not None else "models[0]"
    if not isinstance(like, torch.Tensor):
        raise TypeError(f"{label} must be a Tensor, got {type(like).__name__}")
    if like.dtype not in _validate.FLOATING:
        raise TypeError(f"{label} must be a floating tensor (fp16, bf16, fp32, fp64), got {like.dtype}")
    for i, m in enumerate(models):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"models[{i}] must be a Tensor, got {type(m).__name__}")
        if m.shape != like.shape or m.dtype != like.dtype:
            raise ValueError(f"models[{i}] must have {label}'s shape {tuple(like.shape)} and dtype {like.dtype}, "
                             f"got {tuple(m.shape)} {m.dtype}")
        if m.device != like.device:
            raise ValueError(f"models[{i}] is on {m.device}, {label} on {like.device}: one device per call")
    return like, list(models)


def _check_out(out, like: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a Tensor or None, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must have shape {tuple(like.shape)}, dtype {like.dtype} and device {like.device}, "
                         f"got {tuple(out.shape)} {out.dtype} {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    lo, hi = _validate.byte_range(out)
    for t in inputs:  # a written tile could be read back by a later one, or by a statistics pass
        t_lo, t_hi = _validate.byte_range(t)
        if t.numel() and out.numel() and t_lo < hi and lo < t_hi:
            raise ValueError("out must not share memory with base or models")


def merge_tensors(base, models, *, method: str, weight=1.0, density=1.0, lam: float = 1.0, normalize=None,
                  rescale=None, seed: int = 0, key: int = 0, backend: str = "auto", out=None,
                  offset: int = 0) -> torch.Tensor:
    """One tensor of a merge of `models` into `base` by mergekit's `method` (API.md).

    `weight` and `density`: a float or one per model. `normalize` None takes the method's
    default (True for linear and ties), `rescale` None "density" for the dare_* methods. `key`
    replaces `tensor_key(name)`: model i draws its DARE mask under key + i. `base` may be None
    for linear. `out`: a contiguous tensor of the result's shape, dtype and device, sharing no
    memory with the inputs, written and returned instead of a new tensor. `offset`: flat element
    j draws its DARE mask as global element offset + j (a shard's place in the whole tensor);
    DTensor arguments take their shards' offsets themselves.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if base is None and method != "linear":
        raise ValueError(f"base may be None only for method 'linear', not {method!r}")
    like, models = _tensors(base, models)
    n = len(models)
    weights = _per_model(weight, n, "weight")
    densities = _per_model(density, n, "density", unit=True)
    lam = _validate.finite_float(lam, "lam")
    if normalize is None:
        normalize = method in ("linear", "ties")
    elif not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool or None, got {type(normalize).__name__}")
    if rescale is None:
        rescale = "density" if method in RANDOM else "none"
    elif method not in RANDOM:
        raise ValueError(f"rescale applies to the dare_* methods only, not {method!r}")
    elif rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    seed, key = as_u64(seed, "seed"), as_u64(key, "key")
    offset = _validate.offset_arg(offset)
    if distributed.is_dtensor(like):
        def plain(b, ms, out=None, offset=0):
            return merge_tensors(b, ms, method=method, weight=weights, density=densities, lam=lam, normalize=normalize,
                                 rescale=rescale if method in RANDOM else None, seed=seed, key=key, backend=backend, out=out,
                                 offset=offset)
        return distributed.merge_tensors(base, models, out, offset, method, densities, rescale, plain)
    if out is not None:
        _check_out(out, like, models if base is None else [base, *models])
    name = _backend.resolve(backend, like.device, "merge_tensors")
    if like.numel() == 0:
        return torch.empty_like(like) if out is None else out
    if name == "torch":
        merged = reference.merge_tensors(base, models, method, weights, densities, lam, normalize, rescale, seed,
                                         key, offset).reshape(like.shape)
        return merged if out is None else out.copy_(merged)
    args = (None if base is None else base.contiguous(), _backend.dense(models), method, weights, densities, lam,
            normalize, rescale, as_i64(seed), as_i64(key), offset)
    if out is not None and name in ("cpu", "cuda"):  # the compiled kernels write out themselves
        torch.ops.ntkcl_fast.merge_tensors_into_(out, *args)
        return out
    merged = _backend.kernel(name, "merge_tensors")(*args)
    return merged if out is None else out.copy_(merged)
