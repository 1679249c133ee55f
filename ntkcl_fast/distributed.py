"""DTensor arguments (FSDP2's `fully_shard`, `distribute_tensor`) for the tensor-list ops.

Every op here is elementwise or a sum, so a DTensor argument is handled by its local shard:
elementwise work runs the plain op on `.to_local()` tensors with no communication and wraps
outputs back with the inputs' mesh and placements; a sum adds the local partials and all-reduces
once per call over the mesh dimension that shards the tensors. DARE draws each element by its
global flat index (`offset=`), so a sharded result equals the unsharded one bit for bit.

The op families call in here only when their first tensor is a DTensor (one isinstance check),
so plain tensors take exactly their usual path.
"""
from __future__ import annotations

import math
import sys

import torch


def is_dtensor(t) -> bool:
    # No DTensor exists before torch.distributed.tensor is imported (by the user, FSDP2 or DCP), so
    # the package does not import it (~0.6 s at startup); the functions below run only after this
    # returned True, and import what they use from it then.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


# ------------------------------------------------------------------------------ checks and shards

def check_placements(t, name: str) -> None:
    from torch.distributed.tensor import Replicate, Shard
    for p in t.placements:
        if not isinstance(p, (Shard, Replicate)):
            raise ValueError(f"{name} has placement {p}; only Shard and Replicate placements are supported")


def check_pair(a, a_name: str, b, b_name: str) -> None:
    """`b` is a DTensor on `a`'s mesh with `a`'s placements (ValueError naming `b` otherwise)."""
    if not is_dtensor(b):
        raise ValueError(f"{b_name} must be a DTensor like {a_name}, got a plain {type(b).__name__}")
    if b.device_mesh != a.device_mesh:
        raise ValueError(f"{b_name} and {a_name} must be on one device mesh, got {b.device_mesh} and {a.device_mesh}")
    if tuple(b.placements) != tuple(a.placements):
        raise ValueError(f"{b_name} and {a_name} must have the same placements, "
                         f"got {tuple(b.placements)} and {tuple(a.placements)}")


def local_lists(named: list[tuple[str, list]]) -> list[list[torch.Tensor]]:
    """The local shards of tensor lists paired index by index with the first list, whose every
    entry must be a DTensor; a repeated DTensor gives the same local tensor each time."""
    (first_name, first), *_ = named
    for i, t in enumerate(first):
        if not is_dtensor(t):
            raise ValueError(f"{first_name}[{i}] must be a DTensor like {first_name}[0], got a plain Tensor")
        check_placements(t, f"{first_name}[{i}]")
    for name, tensors in named[1:]:
        for i, (a, b) in enumerate(zip(first, tensors)):
            check_pair(a, f"{first_name}[{i}]", b, f"{name}[{i}]")
    cache: dict[int, torch.Tensor] = {}
    return [[cache.setdefault(id(t), t.to_local()) for t in tensors] for _, tensors in named]


def wrap_like(local: torch.Tensor, like) -> torch.Tensor:
    """`local` as a DTensor with `like`'s mesh, placements, global shape and stride."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def flat_offset(t, name: str) -> int:
    """Global row-major flat index of the local shard's first element. The shard must be one
    contiguous range of the flat tensor: sharded along dim 0 only (FSDP2's Shard(0), uneven
    shards included), or replicated.

    Computed from the mesh coordinate with DTensor's own chunking (ceil-sized chunks, the last
    ones short or empty) in Python ints, so torch.compile sees a constant rather than the
    data-dependent value compute_local_shape_and_global_offset gives it; other Shard kinds
    (_StridedShard) take that function."""
    from torch.distributed.tensor import Shard
    check_placements(t, name)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (its flat index is the row-major one)")
    mesh, coordinate = t.device_mesh, t.device_mesh.get_coordinate()
    row_size = math.prod(t.shape[1:]) if t.dim() else 0
    if coordinate is None or any(isinstance(p, Shard) and type(p) is not Shard for p in t.placements):
        return _torch_flat_offset(t, name, row_size)
    start, length = 0, t.shape[0] if t.dim() else 1
    for mesh_dim, p in enumerate(t.placements):
        if not isinstance(p, Shard) or mesh.size(mesh_dim) == 1:
            continue
        if p.dim != 0:
            raise ValueError(f"{name} is sharded along a dim other than 0 (placements {tuple(t.placements)}); "
                             "DARE needs each local shard to be one range of the flat tensor")
        chunk = -(-length // mesh.size(mesh_dim))
        begin = min(chunk * coordinate[mesh_dim], length)
        start, length = start + begin, min(begin + chunk, length) - begin
    return start * row_size


def _torch_flat_offset(t, name: str, row_size: int) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local_shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(local_shape[1:]) != tuple(t.shape[1:]):
        raise ValueError(f"{name} is sharded along a dim other than 0 (placements {tuple(t.placements)}); "
                         "DARE needs each local shard to be one range of the flat tensor")
    return offsets[0] * row_size if t.dim() else 0


def _shard_dims(t) -> tuple[int, ...]:
    from torch.distributed.tensor import Shard
    return tuple(d for d, p in enumerate(t.placements) if isinstance(p, Shard))


def reduction_split(params: list, name: str, labels: list[str] | None = None):
    """(indices of sharded tensors, indices of replicated ones, process group of the sum): the
    sharded partials are summed over the one mesh dimension that shards them. Errors name
    `labels[i]` when given, else `name[i]`."""
    label = (lambda i: labels[i]) if labels is not None else (lambda i: f"{name}[{i}]")
    mesh, dims = None, None
    sharded, replicated = [], []
    for i, p in enumerate(params):
        d = _shard_dims(p)
        if not d:
            replicated.append(i)
            continue
        if mesh is None:
            mesh, dims = p.device_mesh, d
        elif p.device_mesh != mesh or d != dims:
            raise ValueError(f"{label(i)} is sharded on {p.device_mesh} dims {d}, {label(sharded[0])} on "
                             f"{mesh} dims {dims}; a sum needs one mesh and one sharded mesh dim per call")
        sharded.append(i)
    if dims is not None and len(dims) > 1:
        raise ValueError(f"{label(sharded[0])} is sharded over {len(dims)} mesh dims; sums support one")
    return sharded, replicated, (mesh.get_group(dims[0]) if sharded else None)


class _AllReduceSum(torch.autograd.Function):
    """Sum of a 0-d partial over the ranks of `group`. Backward is the identity: every rank's loss
    is the same global value, so d(loss)/d(local partial) is the incoming gradient itself."""

    @staticmethod
    def forward(ctx, partial, group):
        out = partial.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def all_reduce_sum(partial: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(partial, group)


def _pick(tensors: list, idx: list[int]) -> list:
    return [tensors[i] for i in idx]


# ------------------------------------------------------------------------------ op entry points

def ema_update_(ema, src, decay, backend: str) -> None:
    from .ema import ema_update_ as plain
    ema_l, src_l = local_lists([("ema", ema), ("src", src)])
    if is_dtensor(decay):
        decay = decay.to_local()
    plain(ema_l, src_l, decay, backend=backend)


def fisher_accumulate_(fisher, grads, scale, decay, backend: str) -> None:
    from .penalty import fisher_accumulate_ as plain
    fisher_l, grads_l = local_lists([("fisher", fisher), ("grads", grads)])
    plain(fisher_l, grads_l, scale=scale, decay=decay, backend=backend)


def _penalty_lists(params, anchors, importance):
    named = [("params", params), ("anchors", anchors)] + ([("importance", importance)] if importance else [])
    locals_ = local_lists(named)
    return locals_[0], locals_[1], (locals_[2] if importance else None)


def _split_sum(run, params, name):
    """run(idx) -> local partial of the tensors idx; the global sum with one all-reduce."""
    sharded, replicated, group = reduction_split(params, name)
    value = all_reduce_sum(run(sharded), group) if sharded else None
    if replicated:
        rest = run(replicated)
        value = rest if value is None else value + rest
    return value


def l2_penalty(params, anchors, importance, lam, half, backend: str) -> torch.Tensor:
    """The global penalty, differentiable in `params`: `to_local()` is differentiable and gives
    each parameter a gradient DTensor with its own placements."""
    from .penalty import l2_penalty as plain
    params_l, anchors_l, importance_l = _penalty_lists(params, anchors, importance)

    def run(idx):
        return plain(_pick(params_l, idx), _pick(anchors_l, idx),
                     _pick(importance_l, idx) if importance_l is not None else None,
                     lam=lam, half=half, backend=backend)
    return _split_sum(run, params, "params")


@torch.no_grad()
def l2_penalty_grad_(params, anchors, importance, lam, half, backend: str) -> torch.Tensor:
    """Adds the gradient into each DTensor param's `.grad` (a DTensor of its placements, created
    when None) and returns the global value."""
    from .penalty import l2_penalty_grad_ as plain
    params_l, anchors_l, importance_l = _penalty_lists(params, anchors, importance)
    for i, p in enumerate(params):
        if p.grad is not None:
            check_pair(p, f"params[{i}]", p.grad, f"params[{i}].grad")
            params_l[i].grad = p.grad.to_local()

    def run(idx):
        return plain(_pick(params_l, idx), _pick(anchors_l, idx),
                     _pick(importance_l, idx) if importance_l is not None else None,
                     lam=lam, half=half, backend=backend)
    value = _split_sum(run, params, "params")
    for p, lp in zip(params, params_l):
        if p.grad is None:
            p.grad = wrap_like(lp.grad, p)
    return value


def _rows_q(q, t, offset: int):
    """A per-row q (one value per global row) cut to the local rows of the Shard(0) tensor `t`."""
    if not isinstance(q, torch.Tensor):
        return q
    if is_dtensor(q):
        from torch.distributed.tensor import Replicate
        if any(not isinstance(p, Replicate) for p in q.placements):
            raise ValueError("q as a DTensor must be replicated (it holds one value per global row)")
        q = q.to_local()
    if q.dim() != 1 or t.dim() < 2 or q.shape[0] != t.shape[0]:
        return q  # the plain op names the bad shape
    row = offset // math.prod(t.shape[1:]) if t.numel() else 0
    return q[row:row + t.to_local().shape[0]]


def _dare_args(t, name: str, q, rescale: str, offset: int):
    if rescale == "l1":
        raise ValueError("rescale='l1' needs each tensor's global L1 norms; it is not supported on DTensors")
    if offset != 0:
        raise ValueError(f"offset must be 0 for a DTensor {name}: its shards take their global offsets")
    start = flat_offset(t, name)
    return start, _rows_q(q, t, start)


def check_dare_state_entry(f, f_name: str, b, b_name: str, rescale: str) -> None:
    """An entry of `dare_state_dict` can take the DTensor path (ValueError naming it otherwise)."""
    if rescale == "l1":
        raise ValueError(f"rescale='l1' needs each tensor's global L1 norms; {f_name} is a DTensor")
    check_pair(f, f_name, b, b_name)
    flat_offset(f, f_name)


def dare(finetuned, base, p, q, rescale, seed, key, out, offset, backend: str):
    from .dare import dare as plain
    start, q = _dare_args(finetuned, "finetuned", q, rescale, offset)
    named = [("finetuned", [finetuned]), ("base", [base])] + ([("out", [out])] if out is not None else [])
    locals_ = local_lists(named)
    res = plain(locals_[0][0], locals_[1][0], p, q=q, rescale=rescale, seed=seed, key=key,
                out=locals_[2][0] if out is not None else None, offset=start, backend=backend)
    return out if out is not None else wrap_like(res, finetuned)


def dare_delta_(delta, p, q, rescale, seed, key, offset, backend: str):
    from .dare import dare_delta_ as plain
    start, q = _dare_args(delta, "delta", q, rescale, offset)
    check_placements(delta, "delta")
    plain(delta.to_local(), p, q=q, rescale=rescale, seed=seed, key=key, offset=start, backend=backend)
    return delta


# ------------------------------------------------------------------------------ merge_tensors

def merge_tensors(base, models, out, offset: int, method: str, densities: list[float], rescale: str, plain):
    """merge_tensors on DTensors; `plain(base, models, out=, offset=)` merges plain tensors.

    The methods without a statistic (linear, task_arithmetic, dare_* with rescale density or
    none) merge the local shards with no communication, DARE by the shards' global offsets.
    ties with a density below 1 and rescale="l1" need each model's statistic over the whole
    tensor (its magnitude threshold, its two L1 norms): the full tensors are gathered, merged on
    every rank and the local shard kept, one all-gather per input. Either way the result equals
    the unsharded merge bit for bit."""
    like, like_name = (base, "base") if base is not None else (models[0], "models[0]")
    if offset != 0:
        raise ValueError(f"offset must be 0 for a DTensor {like_name}: its shards take their global offsets")
    check_placements(like, like_name)
    for i, m in enumerate(models):
        check_pair(like, like_name, m, f"models[{i}]")
    if out is not None:
        check_pair(like, like_name, out, "out")
    whole = (method == "ties" and any(r < 1.0 for r in densities)) or (method.startswith("dare") and rescale == "l1")
    if whole:
        merged = plain(None if base is None else base.full_tensor(), [m.full_tensor() for m in models])
        local = _local_part(merged, like).contiguous()
        if out is None:
            return wrap_like(local, like)
        out.to_local().copy_(local)
        return out
    start = flat_offset(like, like_name) if method.startswith("dare") else 0
    res = plain(None if base is None else base.to_local(), [m.to_local() for m in models],
                out=None if out is None else out.to_local(), offset=start)
    return out if out is not None else wrap_like(res, like)


def _local_part(full: torch.Tensor, like) -> torch.Tensor:
    """The block of `full` that `like`'s local shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offsets = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]


# ------------------------------------------------------------------------------ EWC on FSDP2 models

def fsdp_params(model: torch.nn.Module, names: list[str]):
    """(the parameters named `names`, every parameter) of an FSDP2-sharded model (`fully_shard`
    applied in it), or None for any other model. Taken once and kept: between a forward and its
    backward FSDP2 swaps unsharded parameters into the modules, while its sharded ones stay the
    same objects for the model's life (optimizers hold them too)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    named = dict(model.named_parameters())
    for n in names:
        if not is_dtensor(named[n]):
            raise ValueError(f"parameter {n!r} of the FSDP2 model is not a DTensor: create EWC while the model is "
                             "sharded (not between a forward and its backward), every selected parameter under "
                             "fully_shard")
    return [named[n] for n in names], list(named.values())


def fsdp_batch_grads(every_param: list, params: list, loss: torch.Tensor) -> list:
    """`loss`'s gradients of `params` as FSDP2 makes them (backward, then its reduce-scatter: this
    rank's shard of the gradient averaged over the ranks), leaving every `.grad` as it was."""
    saved = [p.grad for p in every_param]
    for p in every_param:
        p.grad = None
    try:
        loss.backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for p, g in zip(every_param, saved):
            p.grad = g


def data_parallel_size(params: list) -> tuple[int, object]:
    """(ranks sharing each batch, their process group) for parameters sharded on one 1-D mesh."""
    mesh = params[0].device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"EWC's Fisher on a {mesh.ndim}-D device mesh (HSDP, tensor parallel) is not "
                                  "supported; FSDP2 on a 1-D mesh is")
    return mesh.size(), mesh.get_group()


def check_equal_batch_sizes(sizes: list[int], params: list) -> None:
    """ValueError on every rank unless each batch has one size on all ranks (one all-reduce):
    only then is FSDP2's rank-averaged gradient the mean-loss gradient of the global batch."""
    _, group = data_parallel_size(params)
    local = torch.tensor(sizes + [-s for s in sizes], dtype=torch.int64, device=params[0].device_mesh.device_type)
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX, group=group)
    largest, smallest = local[:len(sizes)].tolist(), [-s for s in local[len(sizes):].tolist()]
    odd = [b for b, (lo, hi) in enumerate(zip(smallest, largest)) if lo != hi]
    if odd:
        b = odd[0]
        raise ValueError(f"batches: batch {b} has {smallest[b]} to {largest[b]} samples on different ranks; on an "
                         "FSDP2 model every rank must pass batches of one size, batch by batch")
