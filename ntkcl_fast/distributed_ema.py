"""ModelEMA's average of an FSDP2 (`fully_shard`) model: local shards, as torchtitan keeps it.

FSDP2 models cannot be deep-copied, and a full replica per rank would cost a whole model copy
each. The average here is one plain tensor per parameter holding this rank's shard (in the EMA
dtype), so per-rank memory is about 1/world of a full copy; `update` is one fused `ema_update_`
on the local shards, with no communication. `state_dict` wraps the shards back as DTensors of
the parameters' placements, so torch.distributed.checkpoint saves and reshards them.
"""
from __future__ import annotations

import torch

from . import distributed


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP's wrapped module (its parameters are the model's own), else the model."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, ddp) else model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(distributed.is_dtensor(p) for p in model.parameters())


class ShardedAverage:
    """Local-shard average of `model`'s parameters and persistent floating buffers (FSDP2 keeps
    buffers whole on every rank, so they are averaged whole); other buffers are copied."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None, device, persistent_only: bool):
        self.params = [(n, p) for n, p in model.named_parameters()]
        for n, p in self.params:
            if not distributed.is_dtensor(p):
                raise ValueError(f"parameter {n} is a plain tensor in a model with DTensor parameters; "
                                 "ModelEMA needs every parameter sharded the same way (fully_shard the root)")
        sd = model.state_dict(keep_vars=True)
        param_ids = {id(p) for _, p in self.params}
        self.buffers = [(n, b) for n, b in sd.items() if id(b) not in param_ids] if persistent_only else \
            [(n, b) for n, b in model.named_buffers()]
        self.average = [self._new(p.to_local(), dtype, device) for _, p in self.params]
        self.buffer_average = [self._new(b, dtype if b.is_floating_point() else None, device)
                               for _, b in self.buffers]

    @staticmethod
    def _new(t: torch.Tensor, dtype, device) -> torch.Tensor:
        return t.detach().to(device=device or t.device, dtype=dtype or t.dtype, copy=True)

    def model_locals(self) -> list[torch.Tensor]:
        return [p.to_local() for _, p in self.params]

    @torch.no_grad()
    def update(self, decay: float, backend: str, average_buffers: bool) -> None:
        from .ema import ema_update_
        ema, src = list(self.average), [t.detach() for t in self.model_locals()]
        copies = []
        for e, (_, b) in zip(self.buffer_average, self.buffers):
            if average_buffers and e.is_floating_point():
                ema.append(e)
                src.append(b.detach())
            else:
                copies.append((e, b))
        ema_update_(ema, [s.to(e.device) for e, s in zip(ema, src)], decay, backend=backend)
        for e, b in copies:
            e.copy_(b)

    @torch.no_grad()
    def set(self) -> None:
        for e, s in zip(self.average + self.buffer_average, self.model_locals() + [b for _, b in self.buffers]):
            e.copy_(s)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Writes the average into `model`'s local shards and buffers (no communication)."""
        params = [p for _, p in unwrap(model).named_parameters()]
        if len(params) != len(self.params):
            raise ValueError(f"model has {len(params)} parameters, the average {len(self.params)}")
        for i, (p, e) in enumerate(zip(params, self.average)):
            if not distributed.is_dtensor(p) or p.to_local().shape != e.shape:
                raise ValueError(f"model parameter {i} is not sharded like the average")
            p.to_local().copy_(e)
        for (_, b), e in zip(self.buffers, self.buffer_average):
            b.copy_(e)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {prefix + n: distributed.wrap_like(e, p) for (n, p), e in zip(self.params, self.average)}
        out.update({prefix + n: e for (n, _), e in zip(self.buffers, self.buffer_average)})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict, prefix: str) -> None:
        """Values as DTensors of any sharding (DCP resharded them into `state_dict()`'s tensors) or
        full plain tensors (cut to this rank's shard)."""
        names = [prefix + n for n, _ in self.params] + [prefix + n for n, _ in self.buffers]
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing[:3]}")
        for (n, p), e in zip(self.params, self.average):
            v = state[prefix + n]
            if distributed.is_dtensor(v):
                v = v.redistribute(p.device_mesh, p.placements).to_local()
            else:
                v = _local_slice(v, p)
            e.copy_(v)
        for (n, _), e in zip(self.buffers, self.buffer_average):
            e.copy_(state[prefix + n])


def _local_slice(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's shard of the full tensor `full`, laid out as the DTensor `like`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]
