"""L2 / EWC parameter regularization: `l2_penalty`, `l2_penalty_grad_`, `fisher_accumulate_`.

penalty = lam * c * sum_i sum(F_i * (p_i - a_i) ** 2), c = 0.5 if half else 1. The value is a
0-d fp32 tensor computed with a deterministic reduction (fixed chunks, partial sums reduced in a
fixed order), so it is bit-identical from run to run. The gradient is the closed form
2 * c * lam * F_i * (p_i - a_i), computed by the same fused kernel, so no graph of temporaries
is kept.
"""
from __future__ import annotations

import torch

from . import _backend, _validate
from .reference import penalty as reference

if _backend._C is not None:
    def _value_like(params):
        return torch.empty((), dtype=torch.float32, device=params[0].device if params else "cpu")

    @torch.library.register_fake("ntkcl_fast::l2_penalty")
    def _l2_penalty_fake(params, anchors, importance, scale):
        return _value_like(params)

    @torch.library.register_fake("ntkcl_fast::l2_penalty_grad_")
    def _l2_penalty_grad_fake(grads, params, anchors, importance, scale, grad_output, accumulate):
        return _value_like(params)

    @torch.library.register_fake("ntkcl_fast::fisher_accumulate_")
    def _fisher_accumulate_fake(fisher, grads, scale, decay):
        return None


def _value(backend: str, params, anchors, importance, scale: float) -> torch.Tensor:
    """0-d fp32 penalty value on the params' device."""
    if backend == "torch":
        return reference.l2_penalty(params, anchors, importance, scale).to(torch.float32)
    params, anchors = _backend.dense(params), _backend.dense(anchors)
    imp = _backend.dense(importance) if importance is not None else []
    if backend == "triton":
        from .triton.penalty import l2_penalty as triton_l2_penalty
        return triton_l2_penalty(params, anchors, imp, scale, None, None, False)
    return torch.ops.ntkcl_fast.l2_penalty(params, anchors, imp, scale)


def _grad(backend: str, grads, params, anchors, importance, scale: float, grad_output, accumulate: bool):
    """grads[i] (+)= 2 * scale * F_i * (p_i - a_i) * grad_output; returns the 0-d fp32 value."""
    if backend == "torch":
        with torch.no_grad():
            value = reference.l2_penalty(params, anchors, importance, scale).to(torch.float32)
            go = grad_output if grad_output is not None else 1.0
            for g, d in zip(grads, reference.l2_penalty_grad(params, anchors, importance, scale, go)):
                g.copy_(g.to(d.dtype) + d if accumulate else d)
        return value
    params, anchors = _backend.dense(params), _backend.dense(anchors)
    imp = _backend.dense(importance) if importance is not None else []
    work = _backend.dense(grads)
    if backend == "triton":
        from .triton.penalty import l2_penalty as triton_l2_penalty
        value = triton_l2_penalty(params, anchors, imp, scale, work, grad_output, accumulate)
    else:
        value = torch.ops.ntkcl_fast.l2_penalty_grad_(work, params, anchors, imp, scale, grad_output, accumulate)
    _backend.write_back(grads, work)
    return value


class _L2Penalty(torch.autograd.Function):
    """Value from the fused forward kernel; backward writes the closed-form gradient in one pass."""

    @staticmethod
    def forward(ctx, backend, scale, out_dtype, n, has_importance, *tensors):
        params, anchors = list(tensors[:n]), list(tensors[n:2 * n])
        importance = list(tensors[2 * n:3 * n]) if has_importance else None
        ctx.backend, ctx.scale, ctx.n, ctx.has_importance = backend, scale, n, has_importance
        ctx.save_for_backward(*tensors)
        if backend == "torch" and out_dtype != torch.float32:  # the fp64 path gradcheck uses
            return reference.l2_penalty(params, anchors, importance, scale).to(out_dtype)
        return _value(backend, params, anchors, importance, scale).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        tensors = ctx.saved_tensors
        n = ctx.n
        params, anchors = list(tensors[:n]), list(tensors[n:2 * n])
        importance = list(tensors[2 * n:3 * n]) if ctx.has_importance else None
        want = [i for i in range(n) if ctx.needs_input_grad[5 + i]]
        grads = [None] * len(tensors)
        if want:
            out = [torch.empty_like(params[i], memory_format=torch.contiguous_format) for i in want]
            go = grad_output.detach().to(torch.float64 if grad_output.dtype == torch.float64 else torch.float32)
            _grad(ctx.backend, out, [params[i] for i in want], [anchors[i] for i in want],
                  [importance[i] for i in want] if importance is not None else None, ctx.scale, go, False)
            for i, g in zip(want, out):
                grads[i] = g
        return (None, None, None, None, None, *grads)


def _check_pairs(params, anchors, importance):
    params = _validate.tensor_list(params, "params")
    anchors = _validate.tensor_list(anchors, "anchors")
    _validate.same_length(params, "params", anchors, "anchors")
    _validate.same_shapes(params, "params", anchors, "anchors")
    lists = [("params", params), ("anchors", anchors)]
    if importance is not None:
        importance = _validate.tensor_list(importance, "importance")
        _validate.same_length(params, "params", importance, "importance")
        _validate.same_shapes(params, "params", importance, "importance")
        lists.append(("importance", importance))
    for name, tensors in lists:
        _validate.floating_list(tensors, name)
    device = _validate.one_device(lists)
    return params, anchors, importance, device


def _scale(lam, half) -> float:
    lam = _validate.finite_float(lam, "lam")
    if not isinstance(half, bool):
        raise TypeError(f"half must be a bool, got {type(half).__name__}")
    return lam * (0.5 if half else 1.0)


def l2_penalty(params, anchors, importance=None, *, lam: float = 1.0, half: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """0-d fp32 `lam * c * sum_i sum(F_i * (params_i - anchors_i) ** 2)`, differentiable in `params`.

    `importance` (EWC's diagonal Fisher) is None for plain L2 / L2-SP. bf16/fp16 params with
    fp32 anchors and importance are fine: the math runs in fp32.
    """
    params, anchors, importance, device = _check_pairs(params, anchors, importance)
    scale = _scale(lam, half)
    name = _backend.resolve(backend, device or torch.device("cpu"), "l2_penalty")
    if not params:
        return torch.zeros((), dtype=torch.float32)
    # anchors and importance are constants of the penalty: only params carry a gradient
    tensors = params + [a.detach() for a in anchors] + ([f.detach() for f in importance] if importance else [])
    return _L2Penalty.apply(name, scale, torch.float32, len(params), importance is not None, *tensors)


@torch.no_grad()
def l2_penalty_grad_(params, anchors, importance=None, *, lam: float = 1.0, half: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """Adds `2 * c * lam * F_i * (params_i - anchors_i)` into each `params[i].grad` (created when
    None) without an autograd graph, and returns the penalty value (0-d fp32)."""
    params, anchors, importance, device = _check_pairs(params, anchors, importance)
    scale = _scale(lam, half)
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        if g.shape != p.shape:
            raise ValueError(f"params[{i}].grad has shape {tuple(g.shape)}, params[{i}] has {tuple(p.shape)}")
        if g.dtype not in _validate.FLOATING:
            raise TypeError(f"params[{i}].grad has unsupported dtype {g.dtype}")
        if g.device != p.device:
            raise ValueError(f"params[{i}].grad is on {g.device}, params[{i}] on {p.device}")
        if g.is_sparse:
            raise TypeError(f"params[{i}].grad is sparse, which l2_penalty_grad_ does not support")
    existing = [p.grad for p in params if p.grad is not None]
    read = params + anchors + (importance or [])
    _validate.no_overlap(existing, "grad of params", [t for t in read], "inputs")
    name = _backend.resolve(backend, device or torch.device("cpu"), "l2_penalty_grad_")
    if not params:
        return torch.zeros((), dtype=torch.float32)
    # everything is checked: from here on tensors are written
    fresh = [p.grad is None for p in params]
    accumulate = not all(fresh)
    for p, new in zip(params, fresh):
        if new:
            p.grad = torch.zeros_like(p) if accumulate else torch.empty_like(p)
    grads = [p.grad for p in params]
    return _grad(name, grads, [p.detach() for p in params], anchors, importance, scale, None, accumulate)


@torch.no_grad()
def fisher_accumulate_(fisher, grads, *, scale: float = 1.0, decay: float = 1.0, backend: str = "auto") -> None:
    """In place `fisher_i <- decay * fisher_i + scale * grads_i ** 2` for every pair, in one fused call."""
    fisher = _validate.tensor_list(fisher, "fisher")
    grads = _validate.tensor_list(grads, "grads")
    _validate.same_length(fisher, "fisher", grads, "grads")
    _validate.same_shapes(fisher, "fisher", grads, "grads")
    _validate.floating_list(fisher, "fisher")
    _validate.floating_list(grads, "grads")
    device = _validate.one_device([("fisher", fisher), ("grads", grads)])
    scale = _validate.finite_float(scale, "scale")
    decay = _validate.finite_float(decay, "decay")
    _validate.no_overlap(fisher, "fisher", grads, "grads")
    name = _backend.resolve(backend, device or torch.device("cpu"), "fisher_accumulate_")
    if not fisher:
        return
    if name == "torch":
        reference.fisher_accumulate_(fisher, grads, scale, decay)
        return
    work = _backend.dense(fisher)
    src = _backend.dense(grads)
    if name == "triton":
        from .triton.penalty import fisher_accumulate_ as triton_fisher
        triton_fisher(work, src, scale, decay)
    else:
        torch.ops.ntkcl_fast.fisher_accumulate_(work, src, scale, decay)
    _backend.write_back(fisher, work)
