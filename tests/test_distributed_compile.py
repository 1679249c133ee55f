"""torch.compile(fullgraph=True) over the ops on DTensors (gloo on CPU, 2 ranks): the compiled
function equals the eager one bit for bit, with no graph break (the DARE offsets are Python ints
from the mesh coordinate, not data-dependent values)."""
from __future__ import annotations

from .test_distributed import launch


def scenario(rank: int, world: int) -> None:
    """Run by each rank (tests/_dist_worker.py)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ntkcl_fast
    from ntkcl_fast.merge import merge_tensors

    from ._dist_worker import _full

    mesh = init_device_mesh("cpu", (world,))

    def ema(x, y):
        ntkcl_fast.ema_update_([x], [y], 0.9)
        return x

    calls = {
        "ema_update_": ema,
        "l2_penalty": lambda x, y: ntkcl_fast.l2_penalty([x], [y]),
        "dare": lambda x, y: ntkcl_fast.dare(x, y, 0.5, seed=(1 << 64) - 1, key=7),
        "merge_tensors": lambda x, y: merge_tensors(y, [x, x * 0.5], method="dare_ties", density=0.4, seed=3),
    }
    x = distribute_tensor(_full((11, 6), torch.float32, 1), mesh, [Shard(0)])  # uneven at 2 ranks
    y = distribute_tensor(_full((11, 6), torch.float32, 2), mesh, [Shard(0)])
    for name, fn in calls.items():
        want = fn(x.clone(), y.clone())
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x.clone(), y.clone())
        if hasattr(want, "full_tensor"):
            want, got = want.full_tensor(), got.full_tensor()
        assert torch.equal(got, want), f"{name}: compiled differs from eager"


def test_ops_on_dtensors_compile_without_graph_breaks():
    launch("tests.test_distributed_compile:scenario", 2)
