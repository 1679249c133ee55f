"""Orthogonality penalties and NTK-CL's feature losses.

`feature_orthogonality`, `prototype_basis`, `projection_residual`, `gram_orthogonality`,
`cross_orthogonality`, `ntkcl_contrastive` (docs/API.md, "Orthogonality and feature losses").

Every loss is a 0-d tensor in fp32 (fp64 when an input is fp64), differentiable with respect
to every floating input that requires grad; gradients come back in each input's dtype.
Math runs in fp32 for fp16/bf16/fp32 inputs. Zero-norm rows are normalized as
`x / max(||x||, 1e-12)` (torch.nn.functional.normalize), so they give cosines of 0, never NaN.

Each function validates its arguments, resolves the backend (a traced constant under
torch.compile) and calls one op: the reference for "torch", else `ntkcl_fast::<op>` or
`ntkcl_fast_triton::<op>`, whose shared contract (fake kernel, autograd) lives in `_ops`.
"""
from __future__ import annotations

import torch

from .. import _backend, _validate
from ..reference import ortho as reference
from . import _ops  # noqa: F401  (registers the ops' fake kernels and autograd formulas)

EPS = reference.EPS
_REDUCTIONS_FO = ("mean", "sum")
_REDUCTIONS_PR = ("sum", "sumsq")
_NORMS = ("l1", "fro2")


# ----------------------------------------------------------------------------- validation

def _matrix(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _validate.FLOATING:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def _choice(value, name: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _out_dtype(*tensors) -> torch.dtype:
    return reference.math_dtype(*[t.dtype for t in tensors])


def _zero(device, dtype, *tensors) -> torch.Tensor:
    """0 that still carries a (zero) gradient to the inputs, for empty inputs."""
    out = torch.zeros((), dtype=dtype, device=device)
    for t in tensors:
        if t.requires_grad:
            out = out + t.sum().to(dtype) * 0
    return out


def _layer_lists(old, new):
    old = _validate.tensor_list(old, "old")
    new = _validate.tensor_list(new, "new")
    _validate.same_length(old, "old", new, "new")
    for i, (a, b) in enumerate(zip(old, new)):
        _matrix(a, f"old[{i}]")
        _matrix(b, f"new[{i}]")
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"old[{i}] and new[{i}] must have the same number of columns, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return old, new


# ----------------------------------------------------------------------------- backend choice

# On CUDA, "auto" runs the layer-list ops on their Triton kernels: one launch for the whole list
# (per dtype), where the compiled path loops over the layers with several ATen launches each.
# The Triton kernels take no fp64, so a list with an fp64 tensor keeps the compiled order.
_ONE_LAUNCH_LISTS = ("gram_orthogonality", "cross_orthogonality")


@_backend.constant_under_compile
def _triton_runs(device_type: str, op: str) -> bool:
    return _backend.unavailable_reason("triton", device_type, op) is None


def _resolve(backend, device: torch.device, op: str, tensors=()) -> str:
    name = _backend.resolve(backend, device, op)
    if (backend == "auto" and name == "cuda" and op in _ONE_LAUNCH_LISTS
            and all(t.dtype != torch.float64 for t in tensors) and _triton_runs(device.type, op)):
        return "triton"
    return name


# ----------------------------------------------------------------------------- public API

def feature_orthogonality(features, prototypes, *, normalize: bool = True, reduction: str = "mean",
                          backend: str = "auto") -> torch.Tensor:
    """Squared cosine (dot when not `normalize`) between every row of `features [B, D]` and every
    row of `prototypes [K, D]`; `reduction` "mean" (over B*K) or "sum"."""
    _matrix(features, "features")
    _matrix(prototypes, "prototypes")
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"features and prototypes must have the same number of columns, "
                         f"got {tuple(features.shape)} and {tuple(prototypes.shape)}")
    _flag(normalize, "normalize")
    _choice(reduction, "reduction", _REDUCTIONS_FO)
    device = _validate.one_device([("features", [features]), ("prototypes", [prototypes])])
    name = _resolve(backend, device, "feature_orthogonality")
    if features.numel() == 0 or prototypes.numel() == 0:
        return _zero(device, _out_dtype(features, prototypes), features, prototypes)
    if name == "torch":
        return reference.feature_orthogonality(features, prototypes, normalize, reduction)
    op = _backend.kernel(name, "feature_orthogonality")
    return op(features.contiguous(), prototypes.contiguous(), normalize, reduction == "mean")[0]


def prototype_basis(prototypes, rank: int) -> torch.Tensor:
    """`U[:, :rank]` of `torch.linalg.svd(F.normalize(prototypes.T, dim=0), full_matrices=True)`.

    Computed once per task (NTK-CL recomputes it every step); not differentiable. The result is
    fp32 (fp64 for fp64 prototypes), shape [D, rank], with 0 <= rank <= D.
    """
    _matrix(prototypes, "prototypes")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    d = prototypes.shape[1]
    if not 0 <= rank <= d:
        raise ValueError(f"rank must be in [0, D={d}] for prototypes of shape {tuple(prototypes.shape)}, got {rank}")
    if prototypes.shape[0] == 0:
        raise ValueError("prototypes must have at least one row")
    return reference.prototype_basis(prototypes.detach(), rank)


def projection_residual(features, basis, *, normalize: bool = True, reduction: str = "sum",
                        backend: str = "auto") -> torch.Tensor:
    """`r = f - f @ basis @ basis.T` with `f` the (row-normalized) features; `r.sum()` for
    reduction "sum" (NTK-CL's signed sum) or `(r ** 2).sum()` for "sumsq"."""
    _matrix(features, "features")
    _matrix(basis, "basis")
    if basis.shape[0] != features.shape[1]:
        raise ValueError(f"basis must have D={features.shape[1]} rows (features is {tuple(features.shape)}), "
                         f"got shape {tuple(basis.shape)}")
    _flag(normalize, "normalize")
    _choice(reduction, "reduction", _REDUCTIONS_PR)
    device = _validate.one_device([("features", [features]), ("basis", [basis])])
    name = _resolve(backend, device, "projection_residual")
    if features.numel() == 0:
        return _zero(device, _out_dtype(features, basis), features, basis)
    if name == "torch":
        return reference.projection_residual(features, basis, normalize, reduction)
    op = _backend.kernel(name, "projection_residual")
    return op(features.contiguous(), basis.contiguous(), normalize, reduction == "sumsq")


def gram_orthogonality(weights, *, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """sum over the list of `W [N, D]` of mean (or sum) of `(W @ W.T - I) ** 2` (CODA-Prompt)."""
    weights = _validate.tensor_list(weights, "weights")
    for i, w in enumerate(weights):
        _matrix(w, f"weights[{i}]")
    _choice(reduction, "reduction", _REDUCTIONS_FO)
    device = _validate.one_device([("weights", weights)]) or torch.device("cpu")
    name = _resolve(backend, device, "gram_orthogonality", weights)
    dtype = _out_dtype(*weights)
    live = [w for w in weights if w.shape[0] > 0]
    if not live:
        return _zero(device, dtype, *weights)
    if name == "torch":
        return reference.gram_orthogonality(weights, reduction).to(dtype)
    out = _backend.kernel(name, "gram_orthogonality")([w.contiguous() for w in live], reduction == "mean")[0]
    return out if len(live) == len(weights) else out + _zero(device, dtype, *weights)


def cross_orthogonality(old, new, *, norm: str = "l1", backend: str = "auto") -> torch.Tensor:
    """sum over layers of `|old_l @ new_l.T|.sum()` ("l1", O-LoRA) or `((old_l @ new_l.T) ** 2).sum()`
    ("fro2"), `old_l [r_l, D_l]`, `new_l [s_l, D_l]`."""
    old, new = _layer_lists(old, new)
    _choice(norm, "norm", _NORMS)
    device = _validate.one_device([("old", old), ("new", new)]) or torch.device("cpu")
    name = _resolve(backend, device, "cross_orthogonality", old + new)
    dtype = _out_dtype(*old, *new)
    keep = [i for i in range(len(old)) if old[i].numel() and new[i].numel()]
    if not keep:
        return _zero(device, dtype, *old, *new)
    if name == "torch":
        return reference.cross_orthogonality(old, new, norm).to(dtype)
    op = _backend.kernel(name, "cross_orthogonality")
    out = op([old[i].contiguous() for i in keep], [new[i].contiguous() for i in keep], norm == "l1")[0]
    return out if len(keep) == len(old) else out + _zero(device, dtype, *old, *new)


def ntkcl_contrastive(features, labels, *, temperature: float = 0.1, backend: str = "auto") -> torch.Tensor:
    """NTK-CL's mutual-information term on `features [N, D]`, `labels [N]` (integer):
    with `S = norm(f) @ norm(f).T / t`,
    `-log(sum_{i != j, y_i == y_j} exp(S_ij)) + mean_i logsumexp_{j != i} S_ij`,
    computed with stable log-sum-exps (fine for t in [0.01, 1]); `+inf` (with a zero gradient)
    when no two rows share a label, as in NTK-CL's code."""
    _matrix(features, "features")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be an integer or bool tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape [N={features.shape[0]}], got {tuple(labels.shape)}")
    temperature = _validate.finite_float(temperature, "temperature")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = _validate.one_device([("features", [features]), ("labels", [labels])])
    name = _resolve(backend, device, "ntkcl_contrastive")
    if name == "torch" or features.shape[0] == 0:
        return reference.ntkcl_contrastive(features, labels, temperature)
    return _backend.kernel(name, "ntkcl_contrastive")(features.contiguous(), labels.contiguous(), temperature)[0]


from .modules import (CrossOrthogonality, FeatureOrthogonality, GramOrthogonality,  # noqa: E402
                      NtkclContrastive, ProjectionResidual)

__all__ = ["CrossOrthogonality", "FeatureOrthogonality", "GramOrthogonality", "NtkclContrastive",
           "ProjectionResidual", "cross_orthogonality", "feature_orthogonality", "gram_orthogonality",
           "ntkcl_contrastive", "projection_residual", "prototype_basis"]
