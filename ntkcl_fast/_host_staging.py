"""Device-to-host staging for an average kept in host memory (`ModelEMA(model, device="cpu")` of a
CUDA model, timm's `device` argument).

`tensor.to("cpu")` per tensor, as timm does, is one blocking copy into new pageable memory each,
and the CPU update waits for all of them. Here the model's tensors are copied in chunks into two
reused pinned buffers on a side stream, and the CPU averages one chunk while the next is in
flight: the update costs about max(copy, CPU update) instead of their sum, with no allocation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

CHUNK_BYTES = 32 << 20  # per buffer: large enough to keep the copy engine at full speed
ALIGN = 64  # piece offsets in a buffer, so every dtype's view is aligned


@dataclass(frozen=True)
class Piece:
    index: int  # which tensor of the lists
    begin: int  # its flat element range [begin, end)
    end: int
    offset: int  # byte offset of the copy in its chunk's buffer


def plan_chunks(tensors: list[torch.Tensor], chunk_bytes: int) -> list[list[Piece]]:
    """Every element of every tensor in one piece, in order; a chunk's pieces fit chunk_bytes
    (a tensor larger than a chunk is split across chunks)."""
    chunks, current, used = [], [], 0
    for i, t in enumerate(tensors):
        n, item, begin = t.numel(), t.element_size(), 0
        while begin < n:
            room = (chunk_bytes - used) // item
            if room <= 0:
                chunks.append(current)
                current, used = [], 0
                continue
            end = min(n, begin + room)
            current.append(Piece(i, begin, end, used))
            used += -(-(end - begin) * item // ALIGN) * ALIGN
            begin = end
    if current:
        chunks.append(current)
    return chunks


class HostStaging:
    """Two pinned buffers (plain ones when there is no CUDA) and one side stream per device, reused
    across updates: one stream keeps a copy of an abandoned update ordered before the next's."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._buffers: list[torch.Tensor] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _buffer(self, slot: int) -> torch.Tensor:
        while len(self._buffers) <= slot:
            self._buffers.append(torch.empty(self.chunk_bytes, dtype=torch.uint8,
                                             pin_memory=torch.cuda.is_available()))
        return self._buffers[slot]

    def chunks(self, src: list[torch.Tensor], dst: list[torch.Tensor]) -> Iterator[tuple[list, list]]:
        """(dst pieces, host copies of the matching src pieces), chunk by chunk. dst tensors are
        contiguous host tensors of src's shapes; a chunk's host copies are valid until the next
        one is asked for. src on one device (CUDA, or the CPU: then copied synchronously)."""
        plan = plan_chunks(src, self.chunk_bytes)
        if not plan:
            return
        device = src[0].device
        stream = None
        if device.type == "cuda":
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the values this step wrote

        def issue(k: int):
            buf = self._buffer(k % 2)
            views = []
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for p in plan[k]:
                    s = src[p.index].reshape(-1)[p.begin:p.end]
                    view = buf[p.offset:p.offset + s.numel() * s.element_size()].view(s.dtype)
                    view.copy_(s, non_blocking=stream is not None)
                    views.append(view)
                event = None
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
            return views, event

        pending = issue(0)
        for k in range(len(plan)):
            # the other buffer's last reader (chunk k - 1) is done: the caller asked for chunk k
            following = issue(k + 1) if k + 1 < len(plan) else None
            views, event = pending
            if event is not None:
                event.synchronize()
            yield [dst[p.index].view(-1)[p.begin:p.end] for p in plan[k]], views
            pending = following
