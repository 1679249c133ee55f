"""L2 / EWC parameter regularization: `l2_penalty`, `l2_penalty_grad_`, `fisher_accumulate_`.

penalty = lam * c * sum_i sum(F_i * (p_i - a_i) ** 2), c = 0.5 if half else 1. The value is a
0-d fp32 tensor computed with a deterministic reduction (fixed chunks, partial sums reduced in a
fixed order), so it is bit-identical from run to run. The gradient is the closed form
2 * c * lam * F_i * (p_i - a_i), written by one fused pass, so no graph of temporaries is kept.

Every compiled backend is one op with one contract: the extension's `ntkcl_fast::` op or the
Triton op of the same schema in `ntkcl_fast_triton::`, each with the fake kernel below and, for
`l2_penalty`, the autograd formula below. The `torch` backend is the reference itself.
"""
from __future__ import annotations

import torch

from . import _backend, _validate, distributed
from .reference import penalty as reference

_NAMESPACES = (("ntkcl_fast",) if _backend._C is not None else ()) + (_backend.TRITON_NAMESPACE,)


# ---------------------------------------------------------------- Triton ops (extension schemas)
@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::l2_penalty", mutates_args=())
def _triton_l2_penalty(params: list[torch.Tensor], anchors: list[torch.Tensor], importance: list[torch.Tensor],
                       scale: float) -> torch.Tensor:
    from .triton.penalty import l2_penalty as launch
    return launch(params, anchors, importance, scale, None, None, False)


@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::l2_penalty_grad_", mutates_args=("grads",))
def _triton_l2_penalty_grad_(grads: list[torch.Tensor], params: list[torch.Tensor], anchors: list[torch.Tensor],
                             importance: list[torch.Tensor], scale: float, grad_output: torch.Tensor | None,
                             accumulate: bool) -> torch.Tensor:
    from .triton.penalty import l2_penalty as launch
    return launch(params, anchors, importance, scale, grads, grad_output, accumulate)


@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::fisher_accumulate_", mutates_args=("fisher",))
def _triton_fisher_accumulate_(fisher: list[torch.Tensor], grads: list[torch.Tensor], scale: float,
                               decay: float) -> None:
    from .triton.penalty import fisher_accumulate_ as launch
    launch(fisher, grads, scale, decay)


# ---------------------------------------------------------------- fake kernels and autograd
def _check_same(ref, ref_name, other, name) -> None:
    torch._check(len(other) == len(ref), lambda: f"{name} must have one tensor per {ref_name}")
    for x, y in zip(ref, other):
        torch._check(x.dim() == y.dim(), lambda: f"{name} and {ref_name} differ in shape")
        for a, b in zip(x.shape, y.shape):
            torch._check(a == b, lambda: f"{name} and {ref_name} differ in shape")


def _l2_fake(params, anchors, importance, scale):
    _check_same(params, "params", anchors, "anchors")
    if importance:
        _check_same(params, "params", importance, "importance")
    return params[0].new_empty((), dtype=torch.float32)


def _l2_grad_fake(grads, params, anchors, importance, scale, grad_output, accumulate):
    _check_same(params, "params", grads, "grads")
    return _l2_fake(params, anchors, importance, scale)


def _fisher_fake(fisher, grads, scale, decay):
    _check_same(fisher, "fisher", grads, "grads")


def _l2_setup_context(ctx, inputs, output):
    params, anchors, importance, scale = inputs
    ctx.n = len(params)
    ctx.scale = scale
    ctx.save_for_backward(*params, *anchors, *importance)


def _l2_backward(grad_op):
    def backward(ctx, grad_output):
        """The closed form in one pass: the grad op writes fresh gradients (no read of them)."""
        saved, n = ctx.saved_tensors, ctx.n
        params = list(saved[:n])
        grads = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
        importance = list(saved[2 * n:])
        grad_op(grads, params, list(saved[n:2 * n]), importance, ctx.scale, grad_output, False)
        # one entry per input, lists for list inputs: anchors and importance are constants
        return grads, [None] * n, [None] * len(importance), None
    return backward


for _ns in _NAMESPACES:
    torch.library.register_fake(f"{_ns}::l2_penalty", _l2_fake)
    torch.library.register_fake(f"{_ns}::l2_penalty_grad_", _l2_grad_fake)
    torch.library.register_fake(f"{_ns}::fisher_accumulate_", _fisher_fake)
    if _ns != "ntkcl_fast":  # the compiled op has a C++ autograd kernel, csrc/list_autograd.cpp
        torch.library.register_autograd(f"{_ns}::l2_penalty", _l2_backward(getattr(torch.ops, _ns).l2_penalty_grad_),
                                        setup_context=_l2_setup_context)


# ---------------------------------------------------------------- argument checks (one place)
def _scale(lam, half) -> float:
    lam = _validate.finite_float(lam, "lam")
    if not isinstance(half, bool):
        raise TypeError(f"half must be a bool, got {type(half).__name__}")
    return lam * (0.5 if half else 1.0)


def _lists(params, anchors, importance):
    """The tensor lists (importance [] for F = 1), of one length."""
    params = _validate.tensor_list(params, "params")
    anchors = _validate.tensor_list(anchors, "anchors")
    _validate.same_length(params, "params", anchors, "anchors")
    if importance is None:
        return params, anchors, []
    importance = _validate.tensor_list(importance, "importance")
    _validate.same_length(params, "params", importance, "importance")
    return params, anchors, importance


def _compiled_checks(backend: str, *lists) -> bool:
    """True when the compiled op gets these lists as they are: it checks shapes, dtypes and devices
    itself, before it writes, naming argument and index, so Python does not loop over a model for
    them. Otherwise (reference, Triton, strided tensors) `_check_lists` does."""
    return backend in ("cpu", "cuda") and all(t.is_contiguous() for lst in lists for t in lst)


def _check_lists(named) -> None:
    """Pairwise shapes against the first list, floating dtypes, one device."""
    (first_name, first), *rest = named
    for name, tensors in rest:
        _validate.same_shapes(first, first_name, tensors, name)
    for name, tensors in named:
        _validate.floating_list(tensors, name)
    _validate.one_device(named)


def _device(tensors) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


# ---------------------------------------------------------------- l2_penalty
def l2_penalty(params, anchors, importance=None, *, lam: float = 1.0, half: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """0-d fp32 `lam * c * sum_i sum(F_i * (params_i - anchors_i) ** 2)`, differentiable in `params`.

    `importance` (EWC's diagonal Fisher) is None for plain L2 / L2-SP. bf16/fp16 params with
    fp32 anchors and importance are fine: the math runs in fp32.
    """
    scale = _scale(lam, half)
    params, anchors, importance = _lists(params, anchors, importance)
    if params and distributed.is_dtensor(params[0]):
        return distributed.l2_penalty(params, anchors, importance, lam, half, backend)
    name = _backend.resolve(backend, _device(params), "l2_penalty")
    dense = _compiled_checks(name, params, anchors, importance)
    if not dense:
        _check_lists([("params", params), ("anchors", anchors)] + ([("importance", importance)] if importance else []))
    if not params:
        return torch.zeros((), dtype=torch.float32)
    if name == "torch":  # anchors and importance are constants of the penalty: only params carry a gradient
        return reference.l2_penalty(params, [a.detach() for a in anchors],
                                    [f.detach() for f in importance] or None, scale).to(torch.float32)
    if not dense:  # contiguous() of a param is differentiable: its gradient flows back through the copy
        params, anchors, importance = (_backend.dense(x) for x in (params, anchors, importance))
    return _backend.kernel(name, "l2_penalty")(params, anchors, importance, scale)


# ---------------------------------------------------------------- l2_penalty_grad_
def _occurrences(params) -> list[list[int]]:
    """Indices of params by occurrence: round k holds the k-th appearance of each tensor, so a
    tensor listed twice gets its gradient added twice (as autograd would), never raced on."""
    seen: dict[int, int] = {}
    rounds: list[list[int]] = []
    for i, p in enumerate(params):
        k = seen.get(id(p), 0)
        seen[id(p)] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    return rounds


def _grad_run(name, grads, params, anchors, importance, scale, accumulate, dense):
    if name == "torch":
        g_new = reference.l2_penalty_grad(params, anchors, importance or None, scale)
        for g, d in zip(grads, g_new):
            g.copy_(g.to(d.dtype) + d if accumulate else d)
        return reference.l2_penalty(params, anchors, importance or None, scale).to(torch.float32)
    if dense:  # contiguous lists go to the op as they are
        return _backend.kernel(name, "l2_penalty_grad_")(grads, params, anchors, importance, scale, None, accumulate)
    work = _backend.dense(grads)
    value = _backend.kernel(name, "l2_penalty_grad_")(
        work, _backend.dense(params), _backend.dense(anchors), _backend.dense(importance), scale, None, accumulate)
    _backend.write_back(grads, work)
    return value


@torch.no_grad()
def l2_penalty_grad_(params, anchors, importance=None, *, lam: float = 1.0, half: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """Adds `2 * c * lam * F_i * (params_i - anchors_i)` into each `params[i].grad` (created when
    None) without an autograd graph, and returns the penalty value (0-d fp32)."""
    scale = _scale(lam, half)
    params, anchors, importance = _lists(params, anchors, importance)
    if params and distributed.is_dtensor(params[0]):
        return distributed.l2_penalty_grad_(params, anchors, importance, lam, half, backend)
    name = _backend.resolve(backend, _device(params), "l2_penalty_grad_")
    rounds = _occurrences(params)
    first = rounds[0] if rounds else []
    held = [i for i in first if params[i].grad is not None]
    fresh = [i for i in first if params[i].grad is None]
    grads = [params[i].grad for i in held]
    # a split call (fresh and held gradients, or a repeated param) passes sublists to the op, whose
    # messages would then count in the sublist: Python checks those, with the caller's indices
    dense = not (fresh and held) and len(rounds) < 2 and _compiled_checks(name, params, anchors, importance, grads)
    if not dense:
        _check_lists([("params", params), ("anchors", anchors)] + ([("importance", importance)] if importance else []))
    for i, g in zip(held, grads):  # .grad's setter already matched its shape, dtype and device to params[i]
        if g.layout != torch.strided:
            raise TypeError(f"params[{i}].grad is {g.layout}, which l2_penalty_grad_ does not support")
        if not dense and any(s == 0 and n > 1 for n, s in zip(g.shape, g.stride())):
            raise ValueError(f"params[{i}].grad has a stride-0 (expanded) dimension, strides {g.stride()}; "
                             "the gradient needs one memory location per element")
    _validate.no_overlap_labeled([("params", held, grads, ".grad")],
                                 [("params", None, params), ("anchors", None, anchors),
                                  ("importance", None, importance)])
    if not params:
        return torch.zeros((), dtype=torch.float32)

    def run(idx, out, accumulate):
        if len(idx) == len(params):
            return _grad_run(name, out, params, anchors, importance, scale, accumulate, dense)
        return _grad_run(name, out, [params[i] for i in idx], [anchors[i] for i in idx],
                         [importance[i] for i in idx] if importance else [], scale, accumulate, False)

    # Everything is checked. The fresh gradients are attached only after the last call that can
    # fail, so an error leaves every .grad as it was.
    new = [torch.empty_like(params[i]) for i in fresh]
    value = run(fresh, new, False) if fresh else None  # written, never read: no zero fill
    if held:
        v = run(held, grads, True)
        value = v if value is None else value + v
    for i, g in zip(fresh, new):
        params[i].grad = g
    for idx in rounds[1:]:  # a tensor listed again: its gradient is added again
        value = value + run(idx, [params[i].grad for i in idx], True)
    return value


# ---------------------------------------------------------------- fisher_accumulate_
@torch.no_grad()
def fisher_accumulate_(fisher, grads, *, scale: float = 1.0, decay: float = 1.0, backend: str = "auto") -> None:
    """In place `fisher_i <- decay * fisher_i + scale * grads_i ** 2` for every pair, in one fused call."""
    fisher = _validate.tensor_list(fisher, "fisher")
    grads = _validate.tensor_list(grads, "grads")
    _validate.same_length(fisher, "fisher", grads, "grads")
    scale = _validate.finite_float(scale, "scale")
    decay = _validate.finite_float(decay, "decay")
    if fisher and distributed.is_dtensor(fisher[0]):
        distributed.fisher_accumulate_(fisher, grads, scale, decay, backend)
        return
    name = _backend.resolve(backend, _device(fisher), "fisher_accumulate_")
    dense = _compiled_checks(name, fisher, grads)
    if not dense:
        _check_lists([("fisher", fisher), ("grads", grads)])
        _validate.no_broadcast_outputs(fisher, "fisher")
    _validate.no_overlap(fisher, "fisher", grads, "grads")
    if not fisher:
        return
    if name == "torch":
        reference.fisher_accumulate_(fisher, grads, scale, decay)
        return
    if dense:
        _backend.kernel(name, "fisher_accumulate_")(fisher, grads, scale, decay)
        return
    work = _backend.dense(fisher)
    _backend.kernel(name, "fisher_accumulate_")(work, _backend.dense(grads), scale, decay)
    _backend.write_back(fisher, work)
