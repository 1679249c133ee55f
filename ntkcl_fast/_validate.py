"""Argument checks shared by every op: each error names the argument (and list index)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_list(value, name: str) -> list[torch.Tensor]:
    """A single Tensor or a sequence of tensors, as a list."""
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a Tensor or a sequence of tensors, got {type(value).__name__}")
    out = list(value)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
    return out


def same_length(a: list, a_name: str, b: list, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{a_name} and {b_name} must have the same length, got {len(a)} and {len(b)}")


def same_shapes(a: list[torch.Tensor], a_name: str, b: list[torch.Tensor], b_name: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"{a_name}[{i}] and {b_name}[{i}] must have the same shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")


def one_device(named_lists: Sequence[tuple[str, list[torch.Tensor]]]) -> torch.device | None:
    """The device every tensor lives on (None for no tensors); ValueError naming the first stray."""
    device = None
    first = None
    for name, tensors in named_lists:
        for i, t in enumerate(tensors):
            if device is None:
                device, first = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(f"all tensors must be on one device: {name}[{i}] is on {t.device}, "
                                 f"{first} is on {device}")
    return device


def unit_interval(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The byte addresses [start, end) that t's elements occupy (any strides)."""
    start = end = t.data_ptr()
    size = t.element_size()
    for n, s in zip(t.shape, t.stride()):
        if s < 0:
            start += (n - 1) * s * size
        else:
            end += (n - 1) * s * size
    return start, end + size


def no_overlap(written: list[torch.Tensor], w_name: str, read: list[torch.Tensor], r_name: str) -> None:
    """ValueError when a written tensor shares memory with any other written or read tensor.

    Read tensors may overlap each other. Sorting the byte ranges makes this O(n log n), so it
    stays cheap for model-sized lists. Tensors without storage (meta, and the fake tensors
    torch.compile traces with) have no addresses to compare and are not checked here; the
    compiled kernels repeat the check on the real tensors before they write.
    """
    no_overlap_labeled([(w_name, None, written)], [(r_name, None, read)])


def no_broadcast_outputs(tensors: list[torch.Tensor], name: str) -> None:
    """ValueError naming the first written tensor with a stride-0 (expanded) dimension: several of
    its elements share one memory location, so an in-place result cannot be stored in it."""
    for i, t in enumerate(tensors):
        if any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride())):
            raise ValueError(f"{name}[{i}] has a stride-0 (expanded) dimension, shape {tuple(t.shape)} "
                             f"strides {t.stride()}; in-place outputs need one memory location per element")


def finite_float(value, name: str, *, nonnegative: bool = False) -> float:
    """A real, finite Python number as float (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def floating_list(tensors: list[torch.Tensor], name: str) -> None:
    """TypeError naming the first tensor whose dtype is not fp16/bf16/fp32/fp64."""
    for i, t in enumerate(tensors):
        if t.dtype not in FLOATING:
            raise TypeError(f"{name}[{i}] has unsupported dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")


def _start(span) -> int:
    return span[0]


def no_overlap_labeled(written, read) -> None:
    """`no_overlap` over several named lists, so an error names the right argument and index.

    `written` and `read` hold `(name, indices, tensors, suffix)` (suffix optional): tensor k is
    labelled `name[indices[k]]suffix` (`name[k]` when indices is None), e.g. `params[3].grad`
    for the gradient of the fourth param when only some params have one. Labels are formatted
    only for the error.
    """
    if torch.compiler.is_compiling():
        return
    spans = []
    for entries, is_written in ((written, True), (read, False)):
        for entry in entries:
            for k, t in enumerate(entry[2]):
                nbytes = t.nbytes
                if nbytes and not t.is_meta:
                    if t.is_contiguous():  # the common case, without the per-dimension walk
                        lo = t.data_ptr()
                        spans.append((lo, lo + nbytes, is_written, entry, k))
                    else:
                        spans.append((*byte_range(t), is_written, entry, k))
    spans.sort(key=_start)

    def label(entry, k):
        name, indices = entry[0], entry[1]
        return f"{name}[{indices[k] if indices is not None else k}]{entry[3] if len(entry) > 3 else ''}"

    end_any = end_written = -1
    last_any = last_written = None
    for lo, hi, is_written, entry, k in spans:
        other = last_any if is_written and lo < end_any else (last_written if lo < end_written else None)
        if other:
            raise ValueError(f"{label(entry, k)} shares memory with {label(*other)}; "
                             "in-place outputs must not alias any input")
        if hi > end_any:
            end_any, last_any = hi, (entry, k)
        if is_written and hi > end_written:
            end_written, last_written = hi, (entry, k)


def offset_arg(offset) -> int:
    """A global flat index of element 0 (DARE's `offset=`): an int >= 0."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return offset
