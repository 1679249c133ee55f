"""`dare_state_dict`: DARE over a whole state dict (or module), one launch per device for the
tensors that share the keep rule's scalar q, each tensor keyed by its name."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from . import _backend, _validate, distributed
from .dare import _pair, _q_arg, _rescale_arg, _run
from .random import as_i64, as_u64, tensor_key, threshold


def _exclude_arg(exclude) -> list[re.Pattern]:
    if isinstance(exclude, (str, re.Pattern)):
        exclude = (exclude,)
    if not isinstance(exclude, Sequence):
        raise TypeError(f"exclude must be a regex or a sequence of regexes, got {type(exclude).__name__}")
    pats = []
    for i, e in enumerate(exclude):
        if isinstance(e, re.Pattern):
            pats.append(e)
            continue
        if not isinstance(e, str):
            raise TypeError(f"exclude[{i}] must be a str regex, got {type(e).__name__}")
        try:
            pats.append(re.compile(e))
        except re.error as exc:
            raise ValueError(f"exclude[{i}] is not a valid regex ({exc})") from None
    return pats


def _state_args(finetuned, base, buffers: bool) -> tuple[Mapping, Mapping, set | None]:
    """(finetuned mapping, base mapping, names to merge or None for every floating tensor).

    A module stands for its state dict; of a module only the parameters are merged (and the
    floating buffers with `buffers=True`), its other buffers come from the finetuned side.
    """
    merged = None
    maps = []
    for arg, value in (("finetuned", finetuned), ("base", base)):
        if isinstance(value, torch.nn.Module):
            names = {n for n, _ in value.named_parameters()}
            if buffers:
                names |= {n for n, b in value.named_buffers() if b.is_floating_point()}
            merged = names if merged is None else merged & names
            value = {n: t.detach() for n, t in value.state_dict(keep_vars=True).items()}
        elif not isinstance(value, Mapping):
            raise TypeError(f"{arg} must be a mapping name -> tensor or a torch.nn.Module, got {type(value).__name__}")
        maps.append(value)
    return maps[0], maps[1], merged


@torch.no_grad()
def dare_state_dict(finetuned, base, p: float, *, q=None, rescale: str = "density", seed: int = 0, exclude=(),
                    buffers: bool = False, backend: str = "auto") -> dict:
    """DARE over a whole state dict: each floating tensor merged with `dare(..., key=tensor_key(name))`.

    `finetuned` and `base` are mappings name -> tensor or modules (see `_state_args`: of modules
    only parameters are merged, plus floating buffers with `buffers=True`).
    `q`: None, a float, or a mapping name -> float or per-row tensor (names missing from it use
    1 - p). `rescale` as in `dare`, per tensor. Names matching any `exclude` regex (re.search, so
    a pattern matches anywhere in the name; start it with '^' for MergeLM's re.match) and
    non-floating tensors are returned as the finetuned value. All tensors with a scalar q go in one
    launch per device (CUDA kernel; the Triton backend takes one launch per dtype), their keys and
    q in the launch table; tensors with a per-row q, and every tensor under rescale="l1" (its
    norms come first), take one launch each. A DTensor entry (an FSDP2 state dict) takes one call on its
    local shard, drawn by global element index: the result is the DTensor of the unsharded
    result, bit for bit (rescale="l1" is refused there: its norms are global).
    """
    finetuned, base, merged = _state_args(finetuned, base, buffers)
    if set(finetuned) != set(base):
        missing = sorted(set(finetuned) ^ set(base))[:5]
        raise ValueError(f"finetuned and base must have the same keys; differing: {missing}")
    p = _validate.unit_interval(p, "p")
    rescale = _rescale_arg(rescale, q)
    seed = as_u64(seed, "seed")
    pats = _exclude_arg(exclude)
    if q is not None and not isinstance(q, Mapping):
        if isinstance(q, torch.Tensor):
            raise TypeError("q for a state dict must be None, a float or a mapping name -> float/tensor")
    if isinstance(q, Mapping):
        unknown = [k for k in q if k not in finetuned]
        if unknown:
            raise ValueError(f"q names tensors that are not in the state dict: {unknown[:5]}")
    result: dict = {}
    plan = []  # (name, finetuned, base, q float, q rows)
    sharded = []  # (name, finetuned, base, q as given): DTensors, one call each
    for name, f in finetuned.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be str, got {type(name).__name__}")
        b = base[name]
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"finetuned[{name!r}] must be a Tensor, got {type(f).__name__}")
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"base[{name!r}] must be a Tensor, got {type(b).__name__}")
        if not f.is_floating_point() or (merged is not None and name not in merged) or any(
                pt.search(name) for pt in pats):
            result[name] = f
            continue
        _pair(f, b, f"finetuned[{name!r}]", f"base[{name!r}]")
        qn = q.get(name) if isinstance(q, Mapping) else q
        qv, q_rows = _q_arg(qn, p, f, f"q[{name!r}]" if isinstance(q, Mapping) else "q")
        result[name] = None
        if distributed.is_dtensor(f):  # its shards draw by their global element indices
            distributed.check_dare_state_entry(f, f"finetuned[{name!r}]", b, f"base[{name!r}]", rescale)
            sharded.append((name, f, b, qn))
            continue
        plan.append((name, f, b, 1.0 if rescale == "none" else qv, q_rows))
    if plan:
        devices = {f.device for _, f, _, _, _ in plan}
        names = {d: _backend.resolve(backend, d, "dare_multi_") for d in devices}
        t = threshold(p)
        batched: dict[torch.device, list] = {}
        for name, f, b, qv, q_rows in plan:
            bname = names[f.device]
            if bname in ("cpu", "cuda", "triton") and q_rows is None and rescale != "l1":
                batched.setdefault(f.device, []).append((name, f, b, qv))
            else:
                result[name] = _run(bname, None, f, b, p, qv, q_rows, rescale, seed, tensor_key(name))
        for device, items in batched.items():
            fins = [f.contiguous() for _, f, _, _ in items]
            bases = [b.contiguous() for _, _, b, _ in items]
            outs = [torch.empty_like(f, memory_format=torch.contiguous_format) for f in fins]
            _backend.kernel(names[device], "dare_multi_")(outs, fins, bases, t, [qv for *_, qv in items],
                                                         as_i64(seed), [as_i64(tensor_key(n)) for n, *_ in items])
            for (name, *_), o in zip(items, outs):
                result[name] = o
    for name, f, b, qn in sharded:
        result[name] = distributed.dare(f, b, p, qn, rescale, seed, tensor_key(name), None, 0, backend)
    return {name: result[name] for name in finetuned}
