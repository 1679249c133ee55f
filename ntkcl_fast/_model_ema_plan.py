"""The tensor lists `ModelEMA.update` hands to `ema_update_`, walked once per model and reused.

Walking a model (`named_parameters()`, the buffer scan) costs more host time than the fused
update of a small model: ~0.3 ms per update for a 76-module ViT, twice the update itself.
`UpdatePlan` walks both trees once and `fresh()` says, without walking, whether a new walk
would give the same lists.
"""
from __future__ import annotations

from itertools import chain
from operator import attrgetter

import torch

_dtype = attrgetter("dtype")


def buffers(module: torch.nn.Module, persistent_only: bool) -> list[torch.Tensor]:
    """module.buffers() in its order, less the non-persistent ones when `persistent_only`."""
    seen, out = set(), []
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is None or id(b) in seen or (persistent_only and name in m._non_persistent_buffers_set):
                continue
            seen.add(id(b))
            out.append(b)
    return out


def pairs(ema_module: torch.nn.Module, model: torch.nn.Module, persistent_only: bool):
    """(ema, model) tensors in matching order: parameters, then buffers (the persistent ones,
    those of state_dict, when `persistent_only`). Tied tensors once each; the model's own
    tensors, not detached (every caller reads them under no_grad)."""
    ema_p = [p for _, p in ema_module.named_parameters()]
    model_p = [p for _, p in model.named_parameters()]
    ema_b = buffers(ema_module, persistent_only)
    model_b = buffers(model, persistent_only)
    if len(ema_p) != len(model_p) or len(ema_b) != len(model_b):
        raise ValueError(f"model has {len(model_p)} parameters and {len(model_b)} buffers, "
                         f"the EMA copy has {len(ema_p)} and {len(ema_b)}")
    return ema_p, model_p, ema_b, model_b


class Group:
    """One device's averaged pairs. `moves`: some src lives on another device (copied over each
    call); `low` / `rest`: indices that are / are not rounded stochastically. `staged`: an
    average in host memory of a model on one CUDA device, fetched through pinned buffers
    (_host_staging.py)."""

    def __init__(self, device: torch.device):
        self.device, self.ema, self.src, self.moves, self.low, self.rest = device, [], [], False, [], []
        self.staged = False

    def finish(self) -> None:
        devices = {s.device for s in self.src}
        self.staged = (self.device.type == "cpu" and not self.low and len(devices) == 1
                       and next(iter(devices)).type == "cuda" and all(e.is_contiguous() for e in self.ema))


class UpdatePlan:
    """`ModelEMA.update`'s lists for one (average, model) pair.

    The lists hold the tensors themselves (not detached aliases), so a value changed in place
    or through a `.data` swap is read as it is now. `fresh()` compares what the lists were built
    from, each call, in ~50 us for 76 modules instead of the ~300 us walk:
    - every `_parameters` / `_buffers` / `_modules` dict's length, and the identity of each value
      of those that held any: a parameter or buffer assigned, registered or deleted, a module
      added, replaced or removed, `load_state_dict(assign=True)`, a `.to()` that makes new
      Parameters (new device type, or torch's overwrite-on-conversion flag);
    - the non-persistent buffer names (a buffer registered again with other persistence);
    - every tensor's data pointer: a `.data` swap and an in-place `.to()` give new storage, and
      the device, which picks the group, goes with the storage. An empty tensor has no storage
      to compare (its pointer is 0), so its device is compared instead;
    - the average's dtypes (which buffers are floating, which pairs round stochastically).
    A module's dict objects themselves are kept, not read anew: torch replaces them only when it
    builds a module (construction, unpickling), which makes new modules anyway.
    The plan keeps the walked modules and tensors alive, so no id it compares can be reused by
    another object while it exists (the model's tensors stay referenced until the next update
    with another model, or until the average is deleted).
    """

    def __init__(self, ema_module: torch.nn.Module, model: torch.nn.Module,
                 exclude_buffers: bool, stochastic_rounding: bool, keyed: bool = True):
        """`keyed=False`: lists only, no freshness key (under torch.compile, whose guards on the
        modules play that part; data pointers cannot be traced)."""
        self.model, self.ema_module, self.flags = model, ema_module, (exclude_buffers, stochastic_rounding)
        # like timm: with exclude_buffers every buffer is copied (module.buffers()), else only
        # state_dict()'s are touched, so a non-persistent buffer keeps the value it was copied with
        ema_p, model_p, ema_b, model_b = pairs(ema_module, model, persistent_only=not exclude_buffers)
        self.ema_tensors, self.tensors = ema_p + ema_b, ema_p + ema_b + model_p + model_b
        if exclude_buffers:
            averaged, self.copies = list(zip(ema_p, model_p)), list(zip(ema_b, model_b))
        else:
            buffer_pairs = list(zip(ema_b, model_b))
            averaged = list(zip(ema_p, model_p)) + [(e, s) for e, s in buffer_pairs if e.is_floating_point()]
            self.copies = [(e, s) for e, s in buffer_pairs if not e.is_floating_point()]
        groups: dict[torch.device, Group] = {}
        for e, s in averaged:
            group = groups.setdefault(e.device, Group(e.device))
            low = stochastic_rounding and e.dtype in (torch.float16, torch.bfloat16)
            (group.low if low else group.rest).append(len(group.ema))
            group.ema.append(e)
            group.src.append(s)
            group.moves |= s.device != e.device
        self.groups = list(groups.values())
        for group in self.groups:
            group.finish()
        if keyed:
            modules = list(ema_module.modules()) + list(model.modules())
            self.dicts = [d for m in modules for d in (m._parameters, m._buffers, m._modules)]
            self.filled = [d for d in self.dicts if d]  # an empty dict that gains an entry changes length
            self.persistence = [m._non_persistent_buffers_set for m in modules]
            self.storageless = [t for t in self.tensors if t.data_ptr() == 0]
            self.key = self._key()

    def _key(self) -> tuple:
        return (tuple(map(len, self.dicts)),
                tuple(map(id, chain.from_iterable(map(dict.values, self.filled)))),
                tuple(chain.from_iterable(self.persistence)),
                tuple(map(torch.Tensor.data_ptr, self.tensors)),
                tuple(map(_dtype, self.ema_tensors)),
                tuple(t.device for t in self.storageless))

    def fresh(self) -> bool:
        return self._key() == self.key
