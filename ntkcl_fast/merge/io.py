"""safetensors checkpoints in HF layouts: tensor tables from the headers alone, memory-mapped
tensor reads, and an output writer that streams tensors into shards whose headers are planned
up front (so no shard is ever held in memory, and the bytes depend on nothing but the plan).

File format (safetensors): an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}` padded with spaces to
a multiple of 8, then the tensor bytes, offsets relative to the end of the header.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # safetensors' own limit
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in `file`
    end: int


def parse_size(value) -> int:
    """A shard size: an int of bytes, or "5GB" / "500MB" / "2GiB" / "5B" (mergekit's "5B" is 5e9)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and SIZE.match(value):
        digits, unit = SIZE.match(value).groups()
        unit = (unit or "b").lower()
        scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
        number = int(float(digits) * scale)
    else:
        raise ValueError(f"shard_size must be a number of bytes or a size like '5GB', got {value!r}")
    if number <= 0:
        raise ValueError(f"shard_size must be > 0, got {value!r}")
    return number


def read_header(file: Path, label: str) -> dict[str, TensorEntry]:
    """The tensor table of one safetensors file, checked against the file's size; no data read."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{label}: {file.name} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{label}: {file.name} has a malformed header")
    start = 8 + n
    table = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{label}: tensor {name!r} in {file.name}"
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int) and isinstance(end, int)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where} has a malformed or unknown entry {info!r}") from None
        nbytes = dtype.itemsize * _numel(shape)
        if not ok or end - begin != nbytes or begin < 0 or start + end > size:
            raise ValueError(f"{where}: offsets {info['data_offsets']} do not fit shape {list(shape)} "
                             f"{info['dtype']} in a file of {size} bytes")
        table[name] = TensorEntry(file, dtype, shape, start + begin, start + end)
    return table


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_model(directory: Path, label: str) -> dict[str, TensorEntry]:
    """Every tensor of an HF checkpoint (model.safetensors, or the shards of its index)."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{label}: {INDEX} is not a valid index (no weight_map)") from None
        tables = {}
        for name in files:
            if not isinstance(name, str) or not (directory / name).is_file():
                raise ValueError(f"{label}: shard {name!r} named in {INDEX} does not exist")
            tables[name] = read_header(directory / name, label)
        table = {}
        for tensor, file in weight_map.items():
            if tensor not in tables[file]:
                raise ValueError(f"{label}: tensor {tensor!r} is missing from {file}, where {INDEX} places it")
            table[tensor] = tables[file][tensor]
        return table
    if (directory / SINGLE).is_file():
        return read_header(directory / SINGLE, label)
    raise ValueError(f"{label}: {directory} holds neither {SINGLE} nor {INDEX}")


# madvise(MADV_POPULATE_READ) (Linux >= 5.14; not named by Python's mmap module before 3.13):
# fault the pages in read-only, so a private mapping gets no copy-on-write copies
MADV_POPULATE_READ = 22


def read_tensor(entry: TensorEntry, *, pin: bool = False) -> torch.Tensor:
    """A tensor of a safetensors file as a view of a private memory map: no copy, unless it is to
    be pinned for a device or its offset is not aligned to its dtype.

    Each read maps only its tensor's bytes, anew: its pages leave this process's RSS when the
    last view of it is dropped (the page cache keeps them), so RSS holds the tensors in flight,
    not every input read so far. The pages are faulted in here, by the reading thread, so the
    thread that merges them does not wait on the disk.
    """
    numel = _numel(entry.shape)
    if numel == 0:
        return torch.empty(entry.shape, dtype=entry.dtype, pin_memory=pin)
    start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
    with open(entry.file, "rb") as f:  # copy-on-write: writable for torch.frombuffer, never written
        m = mmap.mmap(f.fileno(), entry.end - start, offset=start, access=mmap.ACCESS_COPY)
    _populate(m)
    view = torch.frombuffer(m, dtype=entry.dtype, count=numel, offset=entry.begin - start)
    if not pin and entry.begin % entry.dtype.itemsize == 0:
        return view.view(entry.shape)  # keeps the map alive; it is unmapped with the last view
    out = torch.empty(entry.shape, dtype=entry.dtype, pin_memory=pin)
    out.view(-1).copy_(view)
    return out


def _populate(m: mmap.mmap) -> None:
    if not hasattr(m, "madvise"):  # Windows: the merge faults the pages in itself
        return
    try:
        m.madvise(MADV_POPULATE_READ)
    except OSError:  # an older kernel, or not Linux: ask for readahead instead
        m.madvise(mmap.MADV_WILLNEED)


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * _numel(self.shape)


def natural_key(name: str):
    """layers.2 before layers.10: the order tensors are written in, whatever the inputs' order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def plan_shards(entries: list[OutEntry], shard_size: int) -> list[list[OutEntry]]:
    """Greedy in natural name order: a new shard when the next tensor's data would pass shard_size
    (a tensor larger than shard_size gets a shard of its own, as in transformers and mergekit).
    Inside a shard, wider dtypes first, as safetensors orders them, so every tensor is aligned."""
    shards, current, used = [], [], 0
    for entry in sorted(entries, key=lambda e: natural_key(e.name)):
        if current and used + entry.nbytes > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(entry)
        used += entry.nbytes
    if current or not shards:
        shards.append(current)
    return [sorted(s, key=lambda e: (-e.dtype.itemsize, natural_key(e.name))) for s in shards]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def header_bytes(shard: list[OutEntry]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for e in shard:
        header[e.name] = {"dtype": NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_index(directory: Path, shards: list[list[OutEntry]]) -> None:
    names = shard_names(len(shards))
    weight_map = {e.name: names[k] for k, shard in enumerate(shards) for e in shard}
    content = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)},
               "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0])))}
    (directory / INDEX).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _writeback_starter():
    """sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) where the C library has it (Linux): starts
    the disk writes of a file's dirty pages without waiting for them, so the fsync that closes a
    shard waits for its last tensors only, not for the whole shard after the merge is done."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd: fn(fd, 0, 0, 2)  # a failure here only loses the overlap: fsync still runs


_start_writeback = _writeback_starter()


class ShardWriter:
    """Writes tensors, in plan order, into the planned shard files of `directory`."""

    def __init__(self, directory: Path, shards: list[list[OutEntry]]):
        self._directory, self._shards, self._names = directory, shards, shard_names(len(shards))
        self._shard, self._pos, self._file = 0, 0, None

    def write(self, entry: OutEntry, tensor: torch.Tensor) -> None:
        while self._file is None or self._pos == len(self._shards[self._shard]):
            self._next_file()
        expected = self._shards[self._shard][self._pos]
        if entry != expected or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(f"tensor {entry.name!r} arrived out of plan (expected {expected.name!r})")
        if tensor.numel():
            self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy())
            _start_writeback(self._file.fileno())
        self._pos += 1

    def _next_file(self) -> None:
        if self._file is not None:
            self._close_file()
            self._shard += 1
        # buffered: a raw write() may write less than asked (Linux caps one at ~2 GB), the buffered one loops
        self._file = open(self._directory / self._names[self._shard], "wb")
        self._file.write(header_bytes(self._shards[self._shard]))
        self._pos = 0

    def _close_file(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def finish(self) -> None:
        while self._file is None or self._shard < len(self._shards) - 1:
            self._next_file()  # only empty shards remain (a model without tensors)
        if self._pos != len(self._shards[self._shard]):
            raise RuntimeError("the merge ended before every tensor was written")
        self._close_file()
        self._file = None
        if len(self._shards) > 1:
            write_index(self._directory, self._shards)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
