"""merge_tensors on DTensors (gloo on CPU, world sizes 1, 2 and 3): every method equals the
unsharded merge bit for bit, Shard(0) (uneven and empty shards) and Replicate, with `out=`;
the methods without a statistic communicate nothing; bad pairs raise before anything runs."""
from __future__ import annotations

import pytest

from .test_distributed import launch

METHODS = [("linear", None), ("task_arithmetic", None), ("ties", None), ("dare_linear", "density"),
           ("dare_ties", "none"), ("dare_ties", "l1")]


def scenario(rank: int, world: int) -> None:
    """Run by each rank (tests/_dist_worker.py)."""
    from unittest import mock

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ntkcl_fast.merge import merge_tensors

    from ._dist_worker import SHAPES, _each_raises, _equal, _full

    mesh = init_device_mesh("cpu", (world,))
    for backend in ("torch", "cpu"):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for i, shape in enumerate(SHAPES + [(10, 3)]):
                pl = [Replicate()] if i % 3 == 2 else [Shard(0)]
                base = _full(shape, dtype, i)
                models = [base + 0.1 * _full(shape, dtype, 10 * j + i) for j in range(1, 4)]
                dt = [distribute_tensor(t.clone(), mesh, pl) for t in [base, *models]]
                for method, rescale in METHODS:
                    kw = dict(method=method, weight=[0.7, -0.3, 1.1], seed=(1 << 64) - 7, key=3, backend=backend)
                    if method != "linear":
                        kw["density"] = [0.5, 0.25, 1.0]
                    if rescale is not None:
                        kw["rescale"] = rescale
                    b, bd = (None, None) if method == "linear" else (base, dt[0])
                    want = merge_tensors(b, models, **kw)
                    what = f"{backend} {dtype} {shape} {pl} {method} {rescale}"
                    with mock.patch.object(dist, "all_gather_into_tensor", wraps=dist.all_gather_into_tensor) as ag, \
                            mock.patch.object(dist, "all_gather", wraps=dist.all_gather) as ag2:
                        got = merge_tensors(bd, dt[1:], **kw)
                    gathered = ag.call_count + ag2.call_count
                    statistic = method == "ties" or rescale == "l1"
                    if not statistic or isinstance(pl[0], Replicate) or world == 1:
                        assert gathered == 0, f"{what}: {gathered} gathers for elementwise work"
                    _equal(got, want, what)
                    out = distribute_tensor(torch.full(shape, float("nan"), dtype=dtype), mesh, pl)
                    assert merge_tensors(bd, dt[1:], out=out, **kw) is out
                    _equal(out, want, f"{what} out=")
    a = distribute_tensor(torch.randn(6, 2), mesh, [Shard(0)])
    r = distribute_tensor(torch.randn(6, 2), mesh, [Replicate()])
    _each_raises([
        (lambda: merge_tensors(a, [r], method="task_arithmetic"), ValueError, r"models\[0\]"),
        (lambda: merge_tensors(a, [a.clone(), torch.randn(6, 2)], method="ties"), ValueError, r"models\[1\]"),
        (lambda: merge_tensors(a, [a.clone()], method="dare_linear", density=0.5, offset=2), ValueError, "offset"),
        (lambda: merge_tensors(a, [a.clone()], method="ties", out=r.clone()), ValueError, "out"),
    ])
    if world > 1:
        s1 = distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)])
        _each_raises([(lambda: merge_tensors(s1, [s1.clone()], method="dare_ties", density=0.5), ValueError,
                       "base is sharded along a dim other than 0")])
        # elementwise without DARE: any sharding works
        ta = merge_tensors(s1, [s1 * 2], method="task_arithmetic", weight=0.5)
        assert torch.equal(ta.full_tensor(), merge_tensors(s1.full_tensor(), [s1.full_tensor() * 2],
                                                           method="task_arithmetic", weight=0.5))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_merge_tensors_on_dtensors_equals_single_process(world):
    launch("tests.test_merge_dtensor:scenario", world)
