"""The contract of every orthogonality op, registered once for both op namespaces.

`ntkcl_fast::<op>` (csrc/ntkcl_fast.cpp; ATen compositions for CPU and CUDA tensors) and
`ntkcl_fast_triton::<op>` (the Triton launchers in ntkcl_fast/triton/, defined here with the same
schema) take the same arguments and return the same outputs. Each op gets one fake kernel (shapes
checked with `torch._check`) and, for the forward ops, one autograd formula that calls the
`<op>_backward` of its own namespace; so torch.compile traces every backend to one opaque call and
opcheck holds for all of them.

What a forward returns besides the value is what its backward needs, chosen per op (both
choices timed by bench/bench_ortho_contracts.py):
- feature_orthogonality: S [B, K] and both row norms; ntkcl_contrastive: S [N, N], the row norms
  and both log-sum-exps. Recomputing S in the backward costs a GEMM (fp64 on Triton) over D.
- gram / cross orthogonality: the derivative of the value in each layer's product, one flat
  buffer (N_l x N_l or r_l x s_l per layer, a few KB); the backward is one GEMM per layer and side.
- projection_residual: the value only. The compiled backward of "sum" (NTK-CL's default) needs
  no f U at all (its gradient is 1 - U U^T 1 per row); "sumsq" and the Triton kernels recompute
  f U [B, R], one B x D x R product (7.9 MFLOP at B 256, D 768, R 40), against keeping 40 KiB.
  Not timed.
Those extra outputs are marked non-differentiable. The backward ops are not differentiable again
(their outputs are marked so too): double backward is not supported.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from .. import _backend
from ..reference.ortho import math_dtype

Tensor = torch.Tensor
TRITON = _backend.TRITON_NAMESPACE


# ----------------------------------------------------------------------------- Triton ops

@torch.library.custom_op(f"{TRITON}::feature_orthogonality", mutates_args=())
def _triton_fo(features: Tensor, prototypes: Tensor, normalize: bool, mean: bool) -> tuple[Tensor, Tensor, Tensor,
                                                                                           Tensor]:
    from ..triton import ortho
    return ortho.feature_orthogonality(features, prototypes, normalize, mean)


@torch.library.custom_op(f"{TRITON}::feature_orthogonality_backward", mutates_args=())
def _triton_fo_bwd(grad_output: Tensor, s: Tensor, f_norm: Tensor, p_norm: Tensor, features: Tensor,
                   prototypes: Tensor, normalize: bool, mean: bool, features_grad: bool,
                   prototypes_grad: bool) -> tuple[Tensor, Tensor]:
    from ..triton import ortho
    return ortho.feature_orthogonality_backward(grad_output, s, f_norm, p_norm, features, prototypes, normalize,
                                                mean, features_grad, prototypes_grad)


@torch.library.custom_op(f"{TRITON}::projection_residual", mutates_args=())
def _triton_pr(features: Tensor, basis: Tensor, normalize: bool, sumsq: bool) -> Tensor:
    from ..triton import projection
    return projection.projection_residual(features, basis, normalize, sumsq)


@torch.library.custom_op(f"{TRITON}::projection_residual_backward", mutates_args=())
def _triton_pr_bwd(grad_output: Tensor, features: Tensor, basis: Tensor, normalize: bool, sumsq: bool,
                   features_grad: bool, basis_grad: bool) -> tuple[Tensor, Tensor]:
    from ..triton import projection
    return projection.projection_residual_backward(grad_output, features, basis, normalize, sumsq, features_grad,
                                                   basis_grad)


@torch.library.custom_op(f"{TRITON}::gram_orthogonality", mutates_args=())
def _triton_gram(weights: list[Tensor], mean: bool) -> tuple[Tensor, Tensor]:
    from ..triton import gram
    return gram.gram_orthogonality(weights, mean)


@torch.library.custom_op(f"{TRITON}::gram_orthogonality_backward", mutates_args=())
def _triton_gram_bwd(grad_output: Tensor, d_gram: Tensor, weights: list[Tensor]) -> list[Tensor]:
    from ..triton import gram
    return gram.gram_orthogonality_backward(grad_output, d_gram, weights)


@torch.library.custom_op(f"{TRITON}::cross_orthogonality", mutates_args=())
def _triton_cross(old: list[Tensor], new: list[Tensor], l1: bool) -> tuple[Tensor, Tensor]:
    from ..triton import gram
    return gram.cross_orthogonality(old, new, l1)


@torch.library.custom_op(f"{TRITON}::cross_orthogonality_backward", mutates_args=())
def _triton_cross_bwd(grad_output: Tensor, d_products: Tensor, old: list[Tensor], new: list[Tensor],
                      old_grad: bool, new_grad: bool) -> tuple[list[Tensor], list[Tensor]]:
    from ..triton import gram
    return gram.cross_orthogonality_backward(grad_output, d_products, old, new, old_grad, new_grad)


@torch.library.custom_op(f"{TRITON}::ntkcl_contrastive", mutates_args=())
def _triton_nc(features: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                               Tensor]:
    from ..triton import contrastive
    return contrastive.ntkcl_contrastive(features, labels, temperature)


@torch.library.custom_op(f"{TRITON}::ntkcl_contrastive_backward", mutates_args=())
def _triton_nc_bwd(grad_output: Tensor, s: Tensor, f_norm: Tensor, lse_pos: Tensor, lse_row: Tensor,
                   features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    from ..triton import contrastive
    return contrastive.ntkcl_contrastive_backward(grad_output, s, f_norm, lse_pos, lse_row, features, labels,
                                                  temperature)


# ----------------------------------------------------------------------------- fake kernels

def _matrix(t: Tensor, name: str) -> None:
    torch._check(t.dim() == 2, lambda: f"{name} must be 2-D, got {t.dim()} dims")


def _empty(like: Tensor, dtype: torch.dtype, *shape) -> Tensor:
    return like.new_empty(shape, dtype=dtype)


def _grad_or_empty(t: Tensor, wanted: bool) -> Tensor:
    return torch.empty_like(t) if wanted else t.new_empty((0,))


def _fo_fake(features, prototypes, normalize, mean):
    _matrix(features, "features")
    _matrix(prototypes, "prototypes")
    torch._check(features.shape[1] == prototypes.shape[1], lambda: "features and prototypes must have the same columns")
    dtype = math_dtype(features.dtype, prototypes.dtype)
    b, k = features.shape[0], prototypes.shape[0]
    value, s, f_norm, p_norm = (_empty(features, dtype, *shape) for shape in ((), (b, k), (b,), (k,)))
    return value, s, f_norm, p_norm


def _fo_bwd_fake(grad_output, s, f_norm, p_norm, features, prototypes, normalize, mean, features_grad,
                 prototypes_grad):
    torch._check(s.shape == (features.shape[0], prototypes.shape[0]), lambda: "s must have shape [B, K]")
    return _grad_or_empty(features, features_grad), _grad_or_empty(prototypes, prototypes_grad)


def _pr_fake(features, basis, normalize, sumsq):
    _matrix(features, "features")
    _matrix(basis, "basis")
    torch._check(basis.shape[0] == features.shape[1], lambda: "basis must have D rows")
    return _empty(features, math_dtype(features.dtype, basis.dtype))


def _pr_bwd_fake(grad_output, features, basis, normalize, sumsq, features_grad, basis_grad):
    return _grad_or_empty(features, features_grad), _grad_or_empty(basis, basis_grad)


def _gram_fake(weights, mean):
    torch._check(len(weights) > 0, lambda: "weights must not be empty")
    for w in weights:
        _matrix(w, "weights[i]")
    dtype = math_dtype(*[w.dtype for w in weights])
    return _empty(weights[0], dtype), _empty(weights[0], dtype, sum(w.shape[0] * w.shape[0] for w in weights))


def _gram_bwd_fake(grad_output, d_gram, weights):
    torch._check(d_gram.shape[0] == sum(w.shape[0] * w.shape[0] for w in weights),
                 lambda: "d_gram must have sum N_l^2 elements")
    return [torch.empty_like(w) for w in weights]


def _cross_fake(old, new, l1):
    torch._check(len(old) > 0 and len(old) == len(new), lambda: "old and new must have the same, non-zero length")
    for a, b in zip(old, new):
        _matrix(a, "old[i]")
        _matrix(b, "new[i]")
        torch._check(a.shape[1] == b.shape[1], lambda: "old[i] and new[i] must have the same columns")
    dtype = math_dtype(*[t.dtype for t in [*old, *new]])
    return _empty(old[0], dtype), _empty(old[0], dtype, sum(a.shape[0] * b.shape[0] for a, b in zip(old, new)))


def _cross_bwd_fake(grad_output, d_products, old, new, old_grad, new_grad):
    torch._check(d_products.shape[0] == sum(a.shape[0] * b.shape[0] for a, b in zip(old, new)),
                 lambda: "d_products must have sum r_l s_l elements")
    return ([torch.empty_like(t) for t in old] if old_grad else [],
            [torch.empty_like(t) for t in new] if new_grad else [])


def _nc_fake(features, labels, temperature):
    _matrix(features, "features")
    torch._check(labels.dim() == 1 and labels.shape[0] == features.shape[0], lambda: "labels must have shape [N]")
    dtype = math_dtype(features.dtype)
    n = features.shape[0]
    return (_empty(features, dtype), _empty(features, dtype, n, n), _empty(features, dtype, n),
            _empty(features, dtype), _empty(features, dtype, n))


def _nc_bwd_fake(grad_output, s, f_norm, lse_pos, lse_row, features, labels, temperature):
    torch._check(s.shape == (features.shape[0], features.shape[0]), lambda: "s must have shape [N, N]")
    return torch.empty_like(features)


FAKES = {
    "feature_orthogonality": _fo_fake, "feature_orthogonality_backward": _fo_bwd_fake,
    "projection_residual": _pr_fake, "projection_residual_backward": _pr_bwd_fake,
    "gram_orthogonality": _gram_fake, "gram_orthogonality_backward": _gram_bwd_fake,
    "cross_orthogonality": _cross_fake, "cross_orthogonality_backward": _cross_bwd_fake,
    "ntkcl_contrastive": _nc_fake, "ntkcl_contrastive_backward": _nc_bwd_fake,
}


# ----------------------------------------------------------------------------- autograd

def _keep(ctx, saved: tuple, kept: tuple = ()) -> None:
    """Saves `saved` for the backward; the forward's outputs in `kept` are marked non-differentiable."""
    ctx.save_for_backward(*saved)
    if kept:
        ctx.mark_non_differentiable(*kept)


def _grad_if(grad: Tensor, wanted: bool):
    return grad if wanted else None


def _formulas(ops):
    """(setup_context, backward) of each forward op, calling the backward ops of namespace `ops`."""

    def fo_setup(ctx, inputs, output):
        features, prototypes, ctx.normalize, ctx.mean = inputs
        _keep(ctx, (features, prototypes, *output[1:]), output[1:])

    def fo_backward(ctx, grad, *_):
        f, p, s, f_norm, p_norm = ctx.saved_tensors
        need_f, need_p = ctx.needs_input_grad[:2]
        df, dp = ops.feature_orthogonality_backward(grad, s, f_norm, p_norm, f, p, ctx.normalize, ctx.mean,
                                                    need_f, need_p)
        return _grad_if(df, need_f), _grad_if(dp, need_p), None, None

    def pr_setup(ctx, inputs, output):
        features, basis, ctx.normalize, ctx.sumsq = inputs
        _keep(ctx, (features, basis))

    def pr_backward(ctx, grad):
        f, u = ctx.saved_tensors
        need_f, need_u = ctx.needs_input_grad[:2]
        df, du = ops.projection_residual_backward(grad, f, u, ctx.normalize, ctx.sumsq, need_f, need_u)
        return _grad_if(df, need_f), _grad_if(du, need_u), None, None

    def gram_setup(ctx, inputs, output):
        weights, _ = inputs
        ctx.n = len(weights)
        _keep(ctx, (output[1], *weights), output[1:])

    def gram_backward(ctx, grad, _):
        d_gram, *weights = ctx.saved_tensors
        grads = ops.gram_orthogonality_backward(grad, d_gram, weights)
        return [_grad_if(g, w) for g, w in zip(grads, ctx.needs_input_grad[0])], None

    def cross_setup(ctx, inputs, output):
        old, new, _ = inputs
        ctx.n = len(old)
        _keep(ctx, (output[1], *old, *new), output[1:])

    def cross_backward(ctx, grad, _):
        d_products, *tensors = ctx.saved_tensors
        old, new = tensors[:ctx.n], tensors[ctx.n:]
        need_old, need_new = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_old, d_new = ops.cross_orthogonality_backward(grad, d_products, old, new, any(need_old), any(need_new))
        # a list input takes a list of gradients back, None for each tensor that needs none
        d_old = [_grad_if(g, w) for g, w in zip(d_old, need_old)] if any(need_old) else [None] * ctx.n
        d_new = [_grad_if(g, w) for g, w in zip(d_new, need_new)] if any(need_new) else [None] * ctx.n
        return d_old, d_new, None

    def nc_setup(ctx, inputs, output):
        features, labels, ctx.temperature = inputs
        _keep(ctx, (features, labels, *output[1:]), output[1:])

    def nc_backward(ctx, grad, *_):
        f, labels, *kept = ctx.saved_tensors
        need_f = ctx.needs_input_grad[0]
        df = ops.ntkcl_contrastive_backward(grad, *kept, f, labels, ctx.temperature) if need_f else None
        return df, None, None

    return {"feature_orthogonality": (fo_setup, fo_backward), "projection_residual": (pr_setup, pr_backward),
            "gram_orthogonality": (gram_setup, gram_backward), "cross_orthogonality": (cross_setup, cross_backward),
            "ntkcl_contrastive": (nc_setup, nc_backward)}


def _backward_op_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*tree_leaves(output))


def _no_double_backward(ctx, *grads):
    raise RuntimeError("the orthogonality losses do not support double backward")


# The compiled list ops have C++ autograd kernels (csrc/list_autograd.cpp: the same formulas,
# without a Python autograd kernel and its pytree walk over the Tensor[] arguments on every call).
_CPP_AUTOGRAD = {"ntkcl_fast": ("gram_orthogonality", "cross_orthogonality")}


def _register(namespace: str) -> None:
    for op, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{op}", fake)
    for op, (setup, backward) in _formulas(getattr(torch.ops, namespace)).items():
        if op not in _CPP_AUTOGRAD.get(namespace, ()):
            torch.library.register_autograd(f"{namespace}::{op}", backward, setup_context=setup)
        torch.library.register_autograd(f"{namespace}::{op}_backward", _no_double_backward,
                                        setup_context=_backward_op_setup)


OPS = tuple(FAKES)
_register(TRITON)
if _backend._C is not None:
    _register("ntkcl_fast")
