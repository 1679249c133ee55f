"""The chunked device-to-host staging of an average kept in host memory (ntkcl_fast/_host_staging.py):
every element in exactly one piece, chunks within their buffer, and an update over the chunks equal
to the whole update bit for bit. On the CPU the copies are synchronous; the CUDA test (pinned
buffers, side stream) runs where a GPU is present."""
from __future__ import annotations

import copy

import pytest
import torch

import ntkcl_fast
from ntkcl_fast._host_staging import ALIGN, HostStaging, plan_chunks


def _tensors(dtypes, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dt) for dt, n in zip(dtypes, sizes)]


@pytest.mark.parametrize("chunk_bytes", [64, 200, 4096, 1 << 20])
def test_plan_covers_every_element_once_within_the_chunk(chunk_bytes):
    ts = _tensors([torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32],
                  [1000, 1, 0, 333, 77])
    plan = plan_chunks(ts, chunk_bytes)
    covered = {i: [] for i in range(len(ts))}
    for chunk in plan:
        assert chunk, "an empty chunk"
        for p in chunk:
            nbytes = (p.end - p.begin) * ts[p.index].element_size()
            assert p.offset % ALIGN == 0 and p.offset + nbytes <= chunk_bytes
            covered[p.index].append((p.begin, p.end))
        ends = [p.offset + (p.end - p.begin) * ts[p.index].element_size() for p in chunk]
        assert all(e <= o for e, o in zip(ends, [p.offset for p in chunk][1:])), "pieces overlap"
    for i, t in enumerate(ts):
        ranges = covered[i]
        if t.numel() == 0:
            assert ranges == []
            continue
        assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == t.numel(), i


@pytest.mark.parametrize("chunk_bytes", [128, 1000, 1 << 16])
def test_update_over_chunks_equals_the_whole(chunk_bytes):
    src = _tensors([torch.bfloat16, torch.float32, torch.float16], [999, 4097, 13], seed=1)
    ema = [torch.randn(t.shape, dtype=torch.float32) for t in src]
    want = [e.clone() for e in ema]
    ntkcl_fast.ema_update_(want, src, 0.9)
    staging = HostStaging(chunk_bytes)
    for rep in range(2):  # the buffers are reused
        got = [e.clone() for e in ema]
        for ema_part, src_part in staging.chunks(src, got):
            ntkcl_fast.ema_update_(ema_part, src_part, 0.9)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), rep
    assert len(staging._buffers) <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_model_ema_in_host_memory_of_a_cuda_model_equals_the_cpu_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.LayerNorm(65), torch.nn.Linear(65, 7))
    cuda_model = copy.deepcopy(model).cuda()
    ref = ntkcl_fast.ModelEMA(model, decay=0.9)
    ema = ntkcl_fast.ModelEMA(cuda_model, decay=0.9, device="cpu")
    ema.__dict__["_staging"] = HostStaging(1024)  # several chunks, tensors split across them
    for step in range(3):
        with torch.no_grad():
            for p, q in zip(model.parameters(), cuda_model.parameters()):
                p.add_(0.01 * (step + 1))
                q.add_(0.01 * (step + 1))
        ref.update(model)
        ema.update(cuda_model)
        assert ema._plan.groups[0].staged
    for a, b in zip(ref.module.state_dict().values(), ema.module.state_dict().values()):
        assert b.device.type == "cpu" and torch.equal(a, b)
