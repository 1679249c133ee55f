"""The checkpoint merge's I/O pieces: tensors read as views of memory maps (or copies where a view
cannot be), and the output buffers the engine reuses."""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save_file

from ntkcl_fast.merge import io
from ntkcl_fast.merge.engine import OutputBuffers


def _misaligned_file(path, values: torch.Tensor) -> None:
    """A safetensors file whose one fp32 tensor starts 1 byte past an aligned offset."""
    data = values.numpy().tobytes()
    header = json.dumps({"x": {"dtype": "F32", "shape": list(values.shape), "data_offsets": [1, 1 + len(data)]}})
    header = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" + data)


def test_read_tensor_is_a_private_view_of_the_file(tmp_path):
    x = torch.arange(3 * 1000, dtype=torch.float32).view(3, 1000)
    save_file({"a": torch.ones(7, dtype=torch.bfloat16), "x": x}, str(tmp_path / "m.safetensors"))
    table = io.read_header(tmp_path / "m.safetensors", "model")
    before = (tmp_path / "m.safetensors").read_bytes()
    got = io.read_tensor(table["x"])
    assert torch.equal(got, x) and got.shape == (3, 1000)
    got += 1  # copy-on-write: the file never changes
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert torch.equal(io.read_tensor(table["a"]), torch.ones(7, dtype=torch.bfloat16))


def test_read_tensor_copies_a_misaligned_tensor(tmp_path):
    values = torch.linspace(-1, 1, 37)
    _misaligned_file(tmp_path / "m.safetensors", values)
    entry = io.read_header(tmp_path / "m.safetensors", "model")["x"]
    assert entry.begin % 4 == 1
    got = io.read_tensor(entry)
    assert torch.equal(got, values) and got.data_ptr() % 4 == 0


def test_read_tensor_of_no_elements(tmp_path):
    save_file({"e": torch.empty(0, 3), "x": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    entry = io.read_header(tmp_path / "m.safetensors", "model")["e"]
    assert io.read_tensor(entry).shape == (0, 3)


def test_output_buffers_are_reused_and_stay_few():
    pool = OutputBuffers()
    big = io.OutEntry("big", torch.float32, (100,))
    small = io.OutEntry("small", torch.bfloat16, (3, 7))
    buf, view = pool.take(big)
    assert view.shape == (100,) and view.dtype == torch.float32 and buf.numel() == 400
    pool.give(buf)
    again, view = pool.take(small)  # the free buffer fits: no new one
    assert again is buf and view.shape == (3, 7) and view.dtype == torch.bfloat16
    other, _ = pool.take(small)  # the only one is taken: a new one
    assert other is not buf and other.numel() == 42
    pool.give(other)
    grown, _ = pool.take(io.OutEntry("bigger", torch.float64, (100,)))  # nothing fits: the small one is dropped
    assert grown.numel() == 800
    pool.give(grown)
    pool.give(again)
    assert sorted(b.numel() for b in pool._free) == [400, 800]


def test_bare_cuda_under_torchrun_is_the_local_rank_gpu(monkeypatch):
    from ntkcl_fast.merge.engine import _rank_device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert _rank_device(torch.device("cuda"), 8) == torch.device("cuda", 2)
    assert _rank_device(torch.device("cuda", 1), 8) == torch.device("cuda", 1)  # asked for: kept
    assert _rank_device(torch.device("cuda"), 1) == torch.device("cuda")
    assert _rank_device(torch.device("cpu"), 8) == torch.device("cpu")
