"""DARE / DAREx delta-parameter pruning: `dare_mask`, `dare`, `dare_delta_`, `dare_state_dict`,
`magnitude_prune_`; DAREx's q rescaling (`darex_q_search`, `darex_analytic_q`) lives in darex.py.

The mask of every backend follows the keep rule of docs/API.md (Philox4x32-10 keyed by seed,
tensor key and flat element index); it is recomputed, never stored, so it is the same on every
device, in any order of tensors and under any sharding.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend, _validate, distributed
from ._value_checks import checked_values
from .darex import darex_analytic_q, darex_q_search  # re-exported: the package imports them from here
from .random import M64, as_i64, as_u64, tensor_key, threshold
from .reference import dare as reference

__all__ = ["dare", "dare_delta_", "dare_mask", "dare_state_dict", "darex_analytic_q", "darex_q_search",
           "magnitude_prune_", "tensor_key"]


# ------------------------------------------------------------------------------ op registrations

def _dare_fake(out, finetuned, base, threshold, q, q_rows, seed, key, offset=0):
    torch._check(out.shape == finetuned.shape, lambda: "out and finetuned must have the same shape")
    torch._check(base is None or base.shape == out.shape, lambda: "base and out must have the same shape")


def _dare_multi_fake(out, finetuned, base, threshold, q, seed, keys):
    torch._check(len(out) == len(finetuned) == len(base) == len(q) == len(keys),
                 lambda: "out, finetuned, base, q and keys must have the same length")
    for i, (o, f, b) in enumerate(zip(out, finetuned, base)):
        torch._check(o.shape == f.shape == b.shape, lambda: f"out[{i}], finetuned[{i}] and base[{i}] differ in shape")


def _magnitude_prune_fake(delta, k):
    torch._check(0 <= k <= delta.numel(), lambda: "k must be in [0, numel]")


if _backend._C is not None:
    torch.library.register_fake("ntkcl_fast::dare_")(_dare_fake)
    torch.library.register_fake("ntkcl_fast::dare_multi_")(_dare_multi_fake)
    torch.library.register_fake("ntkcl_fast::magnitude_prune_")(_magnitude_prune_fake)


# The Triton kernels as ops with the extension's schemas (seed and key are uint64 bits in int64).
@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::dare_", mutates_args=("out",))
def _triton_dare_(out: torch.Tensor, finetuned: torch.Tensor, base: torch.Tensor | None, threshold: int,
                  q: float, q_rows: torch.Tensor | None, seed: int, key: int, offset: int = 0) -> None:
    from .triton.dare import dare_ as launch
    launch(out, finetuned, base, threshold, q, q_rows, seed & M64, key & M64, offset)


@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::dare_multi_", mutates_args=("out",))
def _triton_dare_multi_(out: list[torch.Tensor], finetuned: list[torch.Tensor], base: list[torch.Tensor],
                        threshold: int, q: list[float], seed: int, keys: list[int]) -> None:
    from .triton.dare import dare_multi_ as launch
    launch(out, finetuned, base, threshold, q, seed & M64, [k & M64 for k in keys])


_triton_dare_.register_fake(_dare_fake)
_triton_dare_multi_.register_fake(_dare_multi_fake)


# ---------------------------------------------------------------------------------------- checks

def _floating(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _validate.FLOATING:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
    return t


def _pair(finetuned, base, f_name="finetuned", b_name="base") -> None:
    _floating(finetuned, f_name)
    _floating(base, b_name)
    if base.dtype != finetuned.dtype:
        raise TypeError(f"{f_name} ({finetuned.dtype}) and {b_name} ({base.dtype}) must have the same dtype")
    if base.shape != finetuned.shape:
        raise ValueError(f"{f_name} and {b_name} must have the same shape, got "
                         f"{tuple(finetuned.shape)} and {tuple(base.shape)}")
    if base.device != finetuned.device:
        raise ValueError(f"{f_name} and {b_name} must be on one device, got {finetuned.device} and {base.device}")


def _q_arg(q, p: float, like: torch.Tensor, name: str = "q") -> tuple[float, torch.Tensor | None]:
    """(scalar q, per-row q tensor in the math dtype or None)."""
    if q is None:
        return (1.0 - p) if p < 1.0 else 1.0, None  # p == 1 keeps nothing: q is never used
    if isinstance(q, torch.Tensor):
        if q.dim() != 1 or like.dim() < 2 or q.shape[0] != like.shape[0]:
            raise ValueError(f"{name} as a tensor must be 1-D with one value per row "
                             f"({like.shape[0] if like.dim() else 'none'} rows, tensors of 2+ dims), "
                             f"got shape {tuple(q.shape)} for a tensor of shape {tuple(like.shape)}")
        if not q.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {q.dtype}")
        if q.device != like.device:
            raise ValueError(f"{name} must be on {like.device}, got {q.device}")
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        return 1.0, checked_values(q.detach().to(acc).contiguous(), "positive", name)
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"{name} must be None, a float or a 1-D tensor, got {type(q).__name__}")
    q = float(q)
    # the kernels divide in fp32 for fp32 and narrower tensors: a q that is 0 or subnormal there is refused
    tiny = torch.finfo(torch.float32).tiny
    if not (q >= tiny and math.isfinite(q)):
        raise ValueError(f"{name} must be a finite float >= {tiny} (the smallest normal fp32), got {q}")
    return q, None


def _writable(t: torch.Tensor, name: str) -> None:
    """ValueError for a stride-0 (expanded) output: its elements share memory locations."""
    if any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride())):
        raise ValueError(f"{name} has a stride-0 (expanded) dimension, shape {tuple(t.shape)} strides "
                         f"{t.stride()}; in-place outputs need one memory location per element")


def _out_arg(out, finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    if out is None:
        return None
    _floating(out, "out")
    if out.dtype != finetuned.dtype or out.shape != finetuned.shape or out.device != finetuned.device:
        raise ValueError(f"out must match finetuned in shape, dtype and device: got {tuple(out.shape)} "
                         f"{out.dtype} {out.device}, want {tuple(finetuned.shape)} {finetuned.dtype} "
                         f"{finetuned.device}")
    _writable(out, "out")
    if torch.compiler.is_compiling() or out.device.type == "meta":
        return out  # traced and meta tensors have no addresses to compare (as in _validate.no_overlap)
    for name, t in (("finetuned", finetuned), ("base", base)):
        same = (out.data_ptr() == t.data_ptr() and out.stride() == t.stride())
        if not same:
            try:
                _validate.no_overlap([out], "out", [t], name)
            except ValueError:
                raise ValueError(f"out partly overlaps {name}; out may be {name} itself or separate memory") from None
    return out


def _shape_arg(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (Sequence, torch.Size)) or isinstance(shape, (str, bytes)):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    out = []
    for i, s in enumerate(shape):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"shape[{i}] must be an int >= 0, got {s!r}")
        out.append(s)
    return tuple(out)


RESCALES = ("density", "l1", "none")


def _rescale_arg(rescale, q) -> str:
    """The rescale name; `q` (DAREx) is the divisor of "density" and has no meaning for the others."""
    if not isinstance(rescale, str):
        raise TypeError(f"rescale must be one of {RESCALES}, got {type(rescale).__name__}")
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    if q is not None and rescale != "density":
        raise ValueError(f"q divides the kept entries of rescale='density'; it cannot be given with rescale={rescale!r}")
    return rescale


# ------------------------------------------------------------------------------------- kernels

def _kernel(name: str, work: torch.Tensor, fin: torch.Tensor, base: torch.Tensor | None, t: int, q: float,
            q_rows: torch.Tensor | None, seed: int, key: int, offset: int) -> None:
    """work <- merge of contiguous inputs (work may be fin or base), on a compiled or Triton backend."""
    if work.numel():
        _backend.kernel(name, "dare_")(work, fin, base, t, q, q_rows, as_i64(seed), as_i64(key), offset)


def _run_one(name: str, out: torch.Tensor | None, fin: torch.Tensor, base: torch.Tensor | None, p: float,
             q: float, q_rows: torch.Tensor | None, seed: int, key: int, offset: int) -> torch.Tensor:
    if name == "torch":
        qq = q_rows if q_rows is not None else q
        res = (reference.dare(fin, base, p, qq, seed, key, offset) if base is not None
               else reference.dare_delta(fin, p, qq, seed, key, offset))
        if out is None:
            return res
        return out.copy_(res)
    fw = fin.contiguous()
    bw = base.contiguous() if base is not None else None
    if out is None:
        work = torch.empty_like(fw, memory_format=torch.contiguous_format)
    elif out.is_contiguous():
        work = out  # in place on finetuned/base is fine: each element is read before it is written
    else:
        work = torch.empty_like(fw, memory_format=torch.contiguous_format)
    _kernel(name, work, fw, bw, threshold(p), q, q_rows, seed, key, offset)
    if out is None:
        return work
    if work is not out:
        out.copy_(work)
    return out


def _run_l1(name: str, out: torch.Tensor | None, fin: torch.Tensor, base: torch.Tensor | None, p: float,
            seed: int, key: int, offset: int) -> torch.Tensor:
    """`base + keep * delta * (||delta||_1 / ||keep * delta||_1)`, unscaled when either norm is below
    1e-7 (mergekit >= 0.1), in fp32 (fp64 for fp64) and rounded once.

    Two passes: the backend's kernel writes keep * delta (q = 1) into a math-dtype buffer, then the
    two norms and the scaled sum are torch ops. The where() keeps it free of host syncs.
    """
    acc = torch.float64 if fin.dtype == torch.float64 else torch.float32
    delta = fin.to(acc) - base.to(acc) if base is not None else fin.to(acc)
    scaled = reference.l1_rescaled(delta, _run_one(name, None, delta, None, p, 1.0, None, seed, key, offset))
    res = (base.to(acc) + scaled if base is not None else scaled).to(fin.dtype)
    return res if out is None else out.copy_(res)


def _run(name: str, out, fin, base, p: float, q: float, q_rows, rescale: str, seed: int, key: int,
         offset: int = 0):
    if rescale == "l1":
        return _run_l1(name, out, fin, base, p, seed, key, offset)
    return _run_one(name, out, fin, base, p, 1.0 if rescale == "none" else q, q_rows, seed, key, offset)


# ------------------------------------------------------------------------------------- public API

def dare_mask(shape, p: float, *, seed: int = 0, key: int = 0, offset: int = 0, device=None,
              backend: str = "auto") -> torch.Tensor:
    """BoolTensor of `shape`, True where DARE keeps the element (the keep rule of docs/API.md);
    flat element j is the rule's element `offset + j`."""
    shape = _shape_arg(shape)
    p = _validate.unit_interval(p, "p")
    seed, key = as_u64(seed, "seed"), as_u64(key, "key")
    offset = _validate.offset_arg(offset)
    device = torch.device(device) if device is not None else torch.device("cpu")
    name = _backend.resolve(backend, device, "dare_")
    if name == "torch":
        return reference.keep_mask(shape, p, seed, key, device, offset)
    ones = torch.ones(shape, dtype=torch.float32, device=device)
    _kernel(name, ones, ones, None, threshold(p), 1.0, None, seed, key, offset)
    return ones != 0


@torch.no_grad()
def dare(finetuned, base, p: float, *, q=None, rescale: str = "density", seed: int = 0, key: int = 0, out=None,
         offset: int = 0, backend: str = "auto") -> torch.Tensor:
    """`base + keep * (finetuned - base) / q`, q = 1 - p by default (DARE), a float or one per row (DAREx-q).

    `rescale`: "density" (the division by q above), "l1" (kept entries times
    ||delta||_1 / ||kept delta||_1 of the tensor, mergekit >= 0.1) or "none".
    `out` may be `finetuned` or `base` itself (in place). The math runs in fp32 (fp64 for fp64)
    and is rounded once. Flat element j draws the keep rule's element `offset + j`; a DTensor
    takes each shard's global offset itself.
    """
    if distributed.is_dtensor(finetuned):
        return distributed.dare(finetuned, base, p, q, rescale, seed, key, out, offset, backend)
    _pair(finetuned, base)
    p = _validate.unit_interval(p, "p")
    rescale = _rescale_arg(rescale, q)
    qv, q_rows = _q_arg(q, p, finetuned)
    seed, key = as_u64(seed, "seed"), as_u64(key, "key")
    offset = _validate.offset_arg(offset)
    out = _out_arg(out, finetuned, base)
    name = _backend.resolve(backend, finetuned.device, "dare_")
    return _run(name, out, finetuned, base, p, qv, q_rows, rescale, seed, key, offset)


@torch.no_grad()
def dare_delta_(delta, p: float, *, q=None, rescale: str = "density", seed: int = 0, key: int = 0,
                offset: int = 0, backend: str = "auto") -> torch.Tensor:
    """In place `delta <- keep * delta / q` (same keep rule, q, `rescale` and `offset` as `dare`); returns `delta`."""
    if distributed.is_dtensor(delta):
        return distributed.dare_delta_(delta, p, q, rescale, seed, key, offset, backend)
    _floating(delta, "delta")
    _writable(delta, "delta")
    p = _validate.unit_interval(p, "p")
    rescale = _rescale_arg(rescale, q)
    qv, q_rows = _q_arg(q, p, delta)
    seed, key = as_u64(seed, "seed"), as_u64(key, "key")
    offset = _validate.offset_arg(offset)
    name = _backend.resolve(backend, delta.device, "dare_")
    return _run(name, delta, delta, None, p, qv, q_rows, rescale, seed, key, offset)


@torch.no_grad()
def magnitude_prune_(delta, density: float, *, backend: str = "auto") -> torch.Tensor:
    """In place: keep exactly k = round(density * numel) entries of largest |delta| (ties to lower
    flat index), zero the rest; returns `delta`."""
    _floating(delta, "delta")
    _writable(delta, "delta")
    density = _validate.unit_interval(density, "density")
    return prune_k_(delta, round(density * delta.numel()), backend=backend)


def prune_k_(delta: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """magnitude_prune_ with an explicit count k in [0, numel] (delta already validated)."""
    name = _backend.resolve(backend, delta.device, "magnitude_prune_")
    if name == "triton":
        raise RuntimeError("backend 'triton' has no magnitude_prune_ kernel; use 'cuda', 'cpu' or 'torch'")
    if delta.numel() == 0:
        return delta
    if name == "torch":
        keep = reference.magnitude_keep(delta, k).reshape(delta.shape)
        return delta.masked_fill_(~keep, 0)
    work = delta if delta.is_contiguous() else delta.contiguous()
    _backend.kernel(name, "magnitude_prune_")(work, k)
    if work is not delta:
        delta.copy_(work)
    return delta


# imported last: dare_state imports the helpers above
from .dare_state import dare_state_dict  # noqa: E402
