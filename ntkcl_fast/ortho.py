"""Orthogonality penalties and NTK-CL's feature losses.

`feature_orthogonality`, `prototype_basis`, `projection_residual`, `gram_orthogonality`,
`cross_orthogonality`, `ntkcl_contrastive` (docs/API.md, "Orthogonality and feature losses").

Every loss is a 0-d tensor in fp32 (fp64 when an input is fp64), differentiable with respect
to every floating input that requires grad; gradients come back in each input's dtype.
Math runs in fp32 for fp16/bf16/fp32 inputs. Zero-norm rows are normalized as
`x / max(||x||, 1e-12)` (torch.nn.functional.normalize), so they give cosines of 0, never NaN.
"""
from __future__ import annotations

import importlib

import torch

from . import _backend, _validate
from .reference import ortho as reference

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


# ----------------------------------------------------------------------------- dispatch helpers

# On CUDA, "auto" runs the layer-list ops on their Triton kernels: one launch for the whole list
# (per dtype), where the compiled path loops over the layers with several ATen launches each.
_ONE_LAUNCH_LISTS = ("gram_orthogonality", "cross_orthogonality")


def _resolve(backend, device: torch.device, op: str, tensors=()) -> str:
    """`_backend.resolve`, also when the installed extension predates the ortho ops."""
    if (backend == "auto" and device.type == "cuda" and op in _ONE_LAUNCH_LISTS
            and not any(t.dtype == torch.float64 for t in tensors)
            and _backend.unavailable_reason("triton", "cuda", op) is None):
        return "triton"
    if _backend._C is not None and not hasattr(torch.ops.ntkcl_fast, op) and backend in ("auto", "cpu", "cuda"):
        if backend == "auto":
            return "torch"
        raise RuntimeError(f"backend {backend!r} is not available: the installed ntkcl_fast._C has no {op} op; "
                           "reinstall with `pip install --no-build-isolation .`")
    return _backend.resolve(backend, device, op)


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
    dtype = _out_dtype(features, prototypes)
    if features.numel() == 0 or prototypes.numel() == 0:
        return _zero(device, dtype, features, prototypes)
    if name == "torch":
        return reference.feature_orthogonality(features, prototypes, normalize, reduction).to(dtype)
    return _FeatureOrthogonality.apply(name, normalize, reduction == "mean", features, prototypes)


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
    dtype = _out_dtype(features, basis)
    if features.numel() == 0:
        return _zero(device, dtype, features, basis)
    if name == "torch":
        return reference.projection_residual(features, basis, normalize, reduction).to(dtype)
    return _ProjectionResidual.apply(name, normalize, reduction == "sumsq", features, basis)


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
    out = _GramOrthogonality.apply(name, reduction == "mean", *live)
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
    tensors = [old[i] for i in keep] + [new[i] for i in keep]
    out = _CrossOrthogonality.apply(name, norm == "l1", len(keep), *tensors)
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
    dtype = _out_dtype(features)
    if name == "torch" or features.shape[0] == 0:
        return reference.ntkcl_contrastive(features, labels, temperature).to(dtype)
    return _NtkclContrastive.apply(name, temperature, features, labels)


# ----------------------------------------------------------------------------- autograd over fused ops
# Forward: one fused value op. Backward: one op that writes the closed-form gradient (no autograd
# graph of temporaries). cpu and cuda run the ntkcl_fast:: ops; the forward ops of
# feature_orthogonality, ntkcl_contrastive, gram_orthogonality and cross_orthogonality also
# return the products (and norms, log-sum-exps) their backward needs, saved here and handed back
# instead of recomputed.
# triton runs the launchers in ntkcl_fast/triton/: the forward returns the value only and the
# backward recomputes the products tile by tile from the inputs, so nothing of size B x K or N x N
# lives between forward and backward.

_TRITON_MODULES = {"feature_orthogonality": "ortho", "projection_residual": "projection",
                   "gram_orthogonality": "gram", "cross_orthogonality": "gram", "ntkcl_contrastive": "contrastive"}


def _ops(name: str, op: str):
    if name == "triton":
        return importlib.import_module(f".triton.{_TRITON_MODULES[op]}", __package__)
    return torch.ops.ntkcl_fast


def _go(grad_output: torch.Tensor) -> torch.Tensor:
    return grad_output.detach().contiguous()


def _need(ctx, first: int, tensors, grads):
    return [g if ctx.needs_input_grad[first + i] else None for i, g in enumerate(grads)]


class _FeatureOrthogonality(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, normalize, mean, features, prototypes):
        ctx.name, ctx.normalize, ctx.mean = name, normalize, mean
        if name == "triton":
            ctx.save_for_backward(features, prototypes)
            return _ops(name, "feature_orthogonality").feature_orthogonality(features.contiguous(), prototypes.contiguous(), normalize, mean)
        # cpu / cuda: the forward op also returns S [B, K] and the row norms, kept for the backward
        value, s, f_norm, p_norm = _ops(name, "feature_orthogonality").feature_orthogonality(features.contiguous(), prototypes.contiguous(),
                                                                    normalize, mean)
        ctx.save_for_backward(features, prototypes, s, f_norm, p_norm)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        f, p, *kept = ctx.saved_tensors
        f_grad, p_grad = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ops = _ops(ctx.name, "feature_orthogonality")
        if ctx.name == "triton":
            df, dp = ops.feature_orthogonality_backward(_go(grad_output), f.contiguous(), p.contiguous(),
                                                        ctx.normalize, ctx.mean, f_grad, p_grad)
        else:
            s, f_norm, p_norm = kept
            df, dp = ops.feature_orthogonality_backward(_go(grad_output), s, f_norm, p_norm, f.contiguous(),
                                                        p.contiguous(), ctx.normalize, ctx.mean, f_grad, p_grad)
        return None, None, None, df if f_grad else None, dp if p_grad else None


class _ProjectionResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, normalize, sumsq, features, basis):
        ctx.name, ctx.normalize, ctx.sumsq = name, normalize, sumsq
        ctx.save_for_backward(features, basis)
        return _ops(name, "projection_residual").projection_residual(features.contiguous(), basis.contiguous(), normalize, sumsq)

    @staticmethod
    def backward(ctx, grad_output):
        f, u = ctx.saved_tensors
        f_grad, u_grad = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        df, du = _ops(ctx.name, "projection_residual").projection_residual_backward(
            _go(grad_output), f.contiguous(), u.contiguous(), ctx.normalize, ctx.sumsq, f_grad, u_grad)
        return None, None, None, df if f_grad else None, du if u_grad else None


class _GramOrthogonality(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, mean, *weights):
        ctx.name, ctx.mean, ctx.n = name, mean, len(weights)
        dense = [w.contiguous() for w in weights]
        if name == "triton":
            ctx.save_for_backward(*weights)
            return _ops(name, "gram_orthogonality").gram_orthogonality(dense, mean)
        # the forward op also returns W W^T - I per layer, kept for the backward
        value, grams = _ops(name, "gram_orthogonality").gram_orthogonality(dense, mean)
        ctx.save_for_backward(*weights, *grams)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        weights, grams = saved[:ctx.n], list(saved[ctx.n:])
        dense = [w.contiguous() for w in weights]
        ops = _ops(ctx.name, "gram_orthogonality")
        if ctx.name == "triton":
            grads = ops.gram_orthogonality_backward(_go(grad_output), dense, ctx.mean)
        else:
            grads = ops.gram_orthogonality_backward(_go(grad_output), grams, dense, ctx.mean)
        return (None, None, *_need(ctx, 2, weights, grads))


class _CrossOrthogonality(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, l1, n, *tensors):
        ctx.name, ctx.l1, ctx.n = name, l1, n
        t = [x.contiguous() for x in tensors]
        if name == "triton":
            ctx.save_for_backward(*tensors)
            return _ops(name, "cross_orthogonality").cross_orthogonality(t[:n], t[n:], l1)
        # the forward op also returns the products old_l new_l^T, kept for the backward
        value, products = _ops(name, "cross_orthogonality").cross_orthogonality(t[:n], t[n:], l1)
        ctx.save_for_backward(*tensors, *products)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        n = ctx.n
        saved = ctx.saved_tensors
        tensors, products = saved[:2 * n], list(saved[2 * n:])
        t = [x.contiguous() for x in tensors]
        old_grad, new_grad = any(ctx.needs_input_grad[3:3 + n]), any(ctx.needs_input_grad[3 + n:])
        ops = _ops(ctx.name, "cross_orthogonality")
        if ctx.name == "triton":
            d_old, d_new = ops.cross_orthogonality_backward(_go(grad_output), t[:n], t[n:], ctx.l1, old_grad, new_grad)
        else:
            d_old, d_new = ops.cross_orthogonality_backward(_go(grad_output), products, t[:n], t[n:], ctx.l1,
                                                            old_grad, new_grad)
        d_old = list(d_old) if old_grad else [None] * n
        d_new = list(d_new) if new_grad else [None] * n
        return (None, None, None, *_need(ctx, 3, tensors, d_old + d_new))


class _NtkclContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, temperature, features, labels):
        ctx.name, ctx.temperature = name, temperature
        ops = _ops(name, "ntkcl_contrastive")
        if name == "triton":
            ctx.save_for_backward(features, labels)
            return ops.ntkcl_contrastive(features.contiguous(), labels.contiguous(), temperature)
        # the forward op also returns S, the row norms and both log-sum-exps, kept for the backward
        value, *kept = ops.ntkcl_contrastive(features.contiguous(), labels.contiguous(), temperature)
        ctx.save_for_backward(features, labels, *kept)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        f, labels, *kept = ctx.saved_tensors
        ops = _ops(ctx.name, "ntkcl_contrastive")
        if ctx.name == "triton":
            df = ops.ntkcl_contrastive_backward(_go(grad_output), f.contiguous(), labels.contiguous(), ctx.temperature)
        else:
            df = ops.ntkcl_contrastive_backward(_go(grad_output), *kept, f.contiguous(), labels.contiguous(),
                                                ctx.temperature)
        return None, None, df if ctx.needs_input_grad[2] else None, None


if _backend._C is not None and hasattr(torch.ops.ntkcl_fast, "feature_orthogonality"):
    def _value(*tensors):
        dtype = _out_dtype(*tensors)
        return tensors[0].new_empty((), dtype=dtype)

    @torch.library.register_fake("ntkcl_fast::feature_orthogonality")
    def _fo_fake(features, prototypes, normalize, mean):
        dtype = _out_dtype(features, prototypes)
        b, k = features.shape[0], prototypes.shape[0]
        return (_value(features, prototypes), features.new_empty((b, k), dtype=dtype),
                features.new_empty((b,), dtype=dtype), features.new_empty((k,), dtype=dtype))

    @torch.library.register_fake("ntkcl_fast::feature_orthogonality_backward")
    def _fo_bwd_fake(grad_output, s, f_norm, p_norm, features, prototypes, normalize, mean, features_grad,
                     prototypes_grad):
        return (torch.empty_like(features) if features_grad else features.new_empty((0,)),
                torch.empty_like(prototypes) if prototypes_grad else prototypes.new_empty((0,)))

    @torch.library.register_fake("ntkcl_fast::projection_residual")
    def _pr_fake(features, basis, normalize, sumsq):
        return _value(features, basis)

    @torch.library.register_fake("ntkcl_fast::projection_residual_backward")
    def _pr_bwd_fake(grad_output, features, basis, normalize, sumsq, features_grad, basis_grad):
        return (torch.empty_like(features) if features_grad else features.new_empty((0,)),
                torch.empty_like(basis) if basis_grad else basis.new_empty((0,)))

    @torch.library.register_fake("ntkcl_fast::gram_orthogonality")
    def _gram_fake(weights, mean):
        dtype = _out_dtype(*weights)
        return _value(*weights), [w.new_empty((w.shape[0], w.shape[0]), dtype=dtype) for w in weights]

    @torch.library.register_fake("ntkcl_fast::gram_orthogonality_backward")
    def _gram_bwd_fake(grad_output, grams, weights, mean):
        return [torch.empty_like(w) for w in weights]

    @torch.library.register_fake("ntkcl_fast::cross_orthogonality")
    def _cross_fake(old, new, l1):
        dtype = _out_dtype(*old, *new)
        return _value(*old, *new), [a.new_empty((a.shape[0], b.shape[0]), dtype=dtype) for a, b in zip(old, new)]

    @torch.library.register_fake("ntkcl_fast::cross_orthogonality_backward")
    def _cross_bwd_fake(grad_output, products, old, new, l1, old_grad, new_grad):
        return ([torch.empty_like(t) for t in old] if old_grad else [],
                [torch.empty_like(t) for t in new] if new_grad else [])

    @torch.library.register_fake("ntkcl_fast::ntkcl_contrastive")
    def _nc_fake(features, labels, temperature):
        dtype = _out_dtype(features)
        n = features.shape[0]
        return (_value(features), features.new_empty((n, n), dtype=dtype), features.new_empty((n,), dtype=dtype),
                _value(features), features.new_empty((n,), dtype=dtype))

    @torch.library.register_fake("ntkcl_fast::ntkcl_contrastive_backward")
    def _nc_bwd_fake(grad_output, s, f_norm, lse_pos, lse_row, features, labels, temperature):
        return torch.empty_like(features)


# ----------------------------------------------------------------------------- modules

class FeatureOrthogonality(torch.nn.Module):
    """Module form of `feature_orthogonality`: `forward(features, prototypes)`."""

    def __init__(self, *, normalize: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.normalize, self.reduction, self.backend = normalize, reduction, backend

    def forward(self, features, prototypes):
        return feature_orthogonality(features, prototypes, normalize=self.normalize,
                                     reduction=self.reduction, backend=self.backend)


class ProjectionResidual(torch.nn.Module):
    """Module form of `projection_residual` with a fixed basis (a buffer), e.g. from
    `prototype_basis` of the previous tasks' prototypes: `forward(features)`."""

    def __init__(self, basis: torch.Tensor, *, normalize: bool = True, reduction: str = "sum",
                 backend: str = "auto"):
        super().__init__()
        self.register_buffer("basis", basis.detach())
        self.normalize, self.reduction, self.backend = normalize, reduction, backend

    @classmethod
    def from_prototypes(cls, prototypes: torch.Tensor, rank: int, **kwargs) -> "ProjectionResidual":
        return cls(prototype_basis(prototypes, rank), **kwargs)

    def forward(self, features):
        return projection_residual(features, self.basis, normalize=self.normalize,
                                   reduction=self.reduction, backend=self.backend)


class GramOrthogonality(torch.nn.Module):
    """Module form of `gram_orthogonality`: `forward(weights)`."""

    def __init__(self, *, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, weights):
        return gram_orthogonality(weights, reduction=self.reduction, backend=self.backend)


class CrossOrthogonality(torch.nn.Module):
    """Module form of `cross_orthogonality`: `forward(old, new)`."""

    def __init__(self, *, norm: str = "l1", backend: str = "auto"):
        super().__init__()
        self.norm, self.backend = norm, backend

    def forward(self, old, new):
        return cross_orthogonality(old, new, norm=self.norm, backend=self.backend)


class NtkclContrastive(torch.nn.Module):
    """Module form of `ntkcl_contrastive`: `forward(features, labels)`."""

    def __init__(self, *, temperature: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, features, labels):
        return ntkcl_contrastive(features, labels, temperature=self.temperature, backend=self.backend)


__all__ = ["CrossOrthogonality", "FeatureOrthogonality", "GramOrthogonality", "NtkclContrastive",
           "ProjectionResidual", "cross_orthogonality", "feature_orthogonality", "gram_orthogonality",
           "ntkcl_contrastive", "projection_residual", "prototype_basis"]
