"""One rank of the multi-process tests: `python -m tests._dist_worker SCENARIO RANK WORLD PORT [ARG]`
(SCENARIO: a name in SCENARIOS, or `module:function` for the scenarios kept beside their tests).

Every rank builds the same full tensors from one seed, computes the single-process result on
them, then runs the op on DTensors (uneven Shard(0) and Replicate) and checks the gathered
result against it. A failed check raises, so the rank exits non-zero with its traceback.
"""
from __future__ import annotations

import copy
import faulthandler
import gc
import os
import re
import sys
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import ntkcl_fast

BACKENDS = ("torch", "cpu")
# rows fewer than, equal to and not a multiple of the world size: uneven and empty shards
SHAPES = [(7, 5), (1, 3), (4, 1), (13,), (2, 3, 2)]


def _full(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _placements(i):
    return [Replicate()] if i % 4 == 3 else [Shard(0)]


def _dts(mesh, tensors):
    return [distribute_tensor(t.clone(), mesh, _placements(i)) for i, t in enumerate(tensors)]


def _equal(dt, want, what):
    assert isinstance(dt, DTensor), f"{what}: not a DTensor"
    got = dt.full_tensor()
    assert got.dtype == want.dtype and torch.equal(got, want), f"{what}: differs from the single-process result"


def _each_raises(cases) -> None:
    """Every (call, exception type, message pattern) raises that type with a matching message."""
    for call, err, match in cases:
        try:
            call()
        except err as e:
            assert re.search(match, str(e)), f"message {e!r} does not name {match}"
        else:
            raise AssertionError(f"no {err.__name__} for {match}")


def _same_on_every_rank(value, what):
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value.detach().contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{what}: ranks disagree {gathered}"


def _count_all_reduce():
    return mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce)


def check_elementwise(mesh, backend):
    for dtype, src_dtype in [(torch.float32, torch.bfloat16), (torch.float16, torch.float16),
                             (torch.float64, torch.float64)]:
        ema = [_full(s, dtype, i) for i, s in enumerate(SHAPES)]
        src = [_full(s, src_dtype, 100 + i) for i, s in enumerate(SHAPES)]
        want = [e.clone() for e in ema]
        ntkcl_fast.ema_update_(want, src, 0.9, backend=backend)
        ema_dt = _dts(mesh, ema)
        ntkcl_fast.ema_update_(ema_dt, _dts(mesh, src), 0.9, backend=backend)
        for i, (e, w) in enumerate(zip(ema_dt, want)):
            _equal(e, w, f"ema_update_ {backend} {dtype} [{i}]")

        fisher = [_full(s, dtype, 200 + i).abs() for i, s in enumerate(SHAPES)]
        grads = [_full(s, dtype, 300 + i) for i, s in enumerate(SHAPES)]
        want = [f.clone() for f in fisher]
        ntkcl_fast.fisher_accumulate_(want, grads, scale=0.5, decay=0.9, backend=backend)
        fisher_dt = _dts(mesh, fisher)
        ntkcl_fast.fisher_accumulate_(fisher_dt, _dts(mesh, grads), scale=0.5, decay=0.9, backend=backend)
        for i, (f, w) in enumerate(zip(fisher_dt, want)):
            _equal(f, w, f"fisher_accumulate_ {backend} {dtype} [{i}]")


def check_penalty(mesh, backend):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        params = [_full(s, dtype, i) for i, s in enumerate(SHAPES)]
        anchors = [_full(s, torch.float32, 50 + i) for i, s in enumerate(SHAPES)]
        fisher = [_full(s, torch.float32, 60 + i).abs() for i, s in enumerate(SHAPES)]
        ref = [p.clone().requires_grad_() for p in params]
        want = ntkcl_fast.l2_penalty(ref, anchors, fisher, lam=0.3, backend=backend)
        want.backward()
        dts = [d.requires_grad_() for d in _dts(mesh, params)]
        with _count_all_reduce() as calls:
            value = ntkcl_fast.l2_penalty(dts, _dts(mesh, anchors), _dts(mesh, fisher), lam=0.3, backend=backend)
        assert calls.call_count == 1, f"l2_penalty made {calls.call_count} all_reduce calls"
        torch.testing.assert_close(value, want, rtol=1e-6, atol=0)
        _same_on_every_rank(value, "l2_penalty")
        value.backward()
        for i, (d, r) in enumerate(zip(dts, ref)):
            assert tuple(d.grad.placements) == tuple(d.placements), f"grad [{i}] placements {d.grad.placements}"
            _equal(d.grad, r.grad, f"l2_penalty grad {backend} {dtype} [{i}]")

        # l2_penalty_grad_: held gradients (one sharded, one replicated) and fresh ones
        ref = [p.clone() for p in params]
        held = {0: _full(SHAPES[0], dtype, 70), 3: _full(SHAPES[3], dtype, 73)}
        for i, g in held.items():
            ref[i].grad = g.clone()
        want = ntkcl_fast.l2_penalty_grad_(ref, anchors, None, lam=0.7, half=True, backend=backend)
        dts = _dts(mesh, params)
        for i, g in held.items():
            dts[i].grad = distribute_tensor(g.clone(), mesh, _placements(i))
        with _count_all_reduce() as calls:
            value = ntkcl_fast.l2_penalty_grad_(dts, _dts(mesh, anchors), None, lam=0.7, half=True, backend=backend)
        assert calls.call_count == 1, f"l2_penalty_grad_ made {calls.call_count} all_reduce calls"
        torch.testing.assert_close(value, want, rtol=1e-6, atol=0)
        _same_on_every_rank(value, "l2_penalty_grad_")
        for i, (d, r) in enumerate(zip(dts, ref)):
            _equal(d.grad, r.grad, f"l2_penalty_grad_ {backend} {dtype} [{i}]")


def check_dare(mesh, backend):
    seed, key = (1 << 64) - 3, 12345
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for i, shape in enumerate(SHAPES + [(10, 3), (6, 7)]):
            f, b = _full(shape, dtype, i), _full(shape, dtype, 40 + i)
            pl = _placements(i)
            fd, bd = distribute_tensor(f.clone(), mesh, pl), distribute_tensor(b.clone(), mesh, pl)
            _equal(ntkcl_fast.dare(fd, bd, 0.4, seed=seed, key=key, backend=backend),
                   ntkcl_fast.dare(f, b, 0.4, seed=seed, key=key, backend=backend), f"dare {dtype} {shape}")
            want = ntkcl_fast.dare_delta_(f.clone(), 0.6, seed=seed, key=key, backend=backend)
            _equal(ntkcl_fast.dare_delta_(fd.clone(), 0.6, seed=seed, key=key, backend=backend), want,
                   f"dare_delta_ {dtype} {shape}")
            if len(shape) >= 2:
                q = _full((shape[0],), torch.float64, 90 + i).abs().add(0.5)  # the same on every rank
                want = ntkcl_fast.dare(f, b, 0.4, q=q, seed=seed, key=key, backend=backend)
                out = distribute_tensor(f.clone(), mesh, pl)
                got = ntkcl_fast.dare(out, bd, 0.4, q=q, seed=seed, key=key, out=out, backend=backend)
                assert got is out
                _equal(out, want, f"dare per-row q, in place {dtype} {shape}")


def check_dare_state(mesh, backend):
    """dare_state_dict on DTensor state dicts (plain, one-per-row and excluded entries among
    them) and on FSDP2 modules: each DTensor of the unsharded result, bit for bit."""
    from torch.distributed.fsdp import fully_shard
    seed = (1 << 64) - 5
    names = [f"layers.{i}.weight" for i in range(len(SHAPES))]
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        fin = {n: _full(s, dtype, i) for i, (n, s) in enumerate(zip(names, SHAPES))}
        base = {n: _full(s, dtype, 20 + i) for i, (n, s) in enumerate(zip(names, SHAPES))}
        fin["plain"], base["plain"] = _full((3, 4), dtype, 9), _full((3, 4), dtype, 19)
        fin["count"], base["count"] = torch.arange(5), torch.arange(5)
        q = {names[0]: _full((7,), torch.float64, 8).abs().add(0.5), names[1]: 0.3}
        dts = [dict(zip(names, _dts(mesh, [d[n] for n in names])), plain=d["plain"], count=d["count"])
               for d in (fin, base)]
        for kwargs in (dict(q=q, exclude=r"\.2\."), dict(rescale="none")):
            want = ntkcl_fast.dare_state_dict(fin, base, 0.4, seed=seed, backend=backend, **kwargs)
            got = ntkcl_fast.dare_state_dict(*dts, 0.4, seed=seed, backend=backend, **kwargs)
            assert list(got) == list(want), "keys or their order differ"
            for n in names:
                _equal(got[n], want[n], f"dare_state_dict {backend} {dtype} {kwargs} {n}")
            assert torch.equal(got["plain"], want["plain"]) and got["count"] is dts[0]["count"]
    ref_f, ref_b = _mlp(), _mlp()
    with torch.no_grad():
        for p in ref_f.parameters():
            p.add_(1)
    want = ntkcl_fast.dare_state_dict(ref_f, ref_b, 0.7, seed=3, buffers=True, backend=backend)
    for m in (model_f := copy.deepcopy(ref_f), model_b := copy.deepcopy(ref_b)):
        fully_shard(m, mesh=mesh)
    got = ntkcl_fast.dare_state_dict(model_f, model_b, 0.7, seed=3, buffers=True, backend=backend)
    _check_average(got, want, f"dare_state_dict of FSDP2 modules {backend}")


def check_errors(mesh):
    a = distribute_tensor(torch.randn(6, 2), mesh, [Shard(0)])
    r = distribute_tensor(torch.randn(6, 2), mesh, [Replicate()])
    before = a.full_tensor()
    cases = [
        (lambda: ntkcl_fast.ema_update_([a, a.clone()], [a.clone(), r], 0.5), ValueError, r"src\[1\]"),
        (lambda: ntkcl_fast.ema_update_([a, a.clone()], [a.clone(), torch.randn(6, 2)], 0.5), ValueError, r"src\[1\]"),
        (lambda: ntkcl_fast.fisher_accumulate_([a], [r]), ValueError, r"grads\[0\]"),
        (lambda: ntkcl_fast.l2_penalty([a], [r]), ValueError, r"anchors\[0\]"),
        (lambda: ntkcl_fast.dare(a, r, 0.5), ValueError, r"base"),
        (lambda: ntkcl_fast.dare(a, a.clone(), 0.5, offset=4), ValueError, "offset"),
        (lambda: ntkcl_fast.dare(a, a.clone(), 0.5, rescale="l1"), ValueError, "rescale"),
        (lambda: ntkcl_fast.dare_state_dict({"w": a}, {"w": r}, 0.5), ValueError, r"base\['w'\]"),
        (lambda: ntkcl_fast.dare_state_dict({"w": a}, {"w": a.clone()}, 0.5, rescale="l1"), ValueError,
         r"rescale.*finetuned\['w'\]"),
    ]
    if mesh.size() > 1:
        s1 = distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)])
        cases.append((lambda: ntkcl_fast.dare_delta_(s1, 0.5), ValueError, "delta"))
        cases.append((lambda: ntkcl_fast.dare_state_dict({"w": s1}, {"w": s1.clone()}, 0.5), ValueError,
                      r"finetuned\['w'\] is sharded along a dim other than 0"))
    _each_raises(cases)
    assert torch.equal(a.full_tensor(), before), "a failed call wrote"


def scenario_ops(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    for backend in BACKENDS:
        check_elementwise(mesh, backend)
        check_penalty(mesh, backend)
        check_dare(mesh, backend)
        check_dare_state(mesh, backend)
    check_errors(mesh)


def _mlp():
    torch.manual_seed(0)  # 7 and 3 rows: uneven shards at world 2 and 3, empty ones at 3 / 5
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))


def _train_steps(ref, models, steps, emas):
    """Sets every model to the same new values per step, then updates each EMA."""
    from ntkcl_fast.distributed_ema import _local_slice, unwrap
    for k in range(steps):
        with torch.no_grad():
            for i, p_ref in enumerate(ref.parameters()):
                full = _full(p_ref.shape, p_ref.dtype, 1000 * k + i)
                p_ref.copy_(full)
                for m in models:
                    p = list(unwrap(m).parameters())[i]
                    (p.to_local().copy_(_local_slice(full, p)) if isinstance(p, DTensor) else p.copy_(full))
            for b_ref, *bs in zip(ref.buffers(), *[unwrap(m).buffers() for m in models]):
                b_ref.add_(k + 1)
                for b in bs:
                    b.add_(k + 1)
        for ema, m in emas:
            ema.update(m, step=k + 10)


def _reference_ema(steps):
    ref = _mlp()
    ref_ema = ntkcl_fast.ModelEMA(ref, decay=0.8, use_warmup=True)
    _train_steps(ref, [], steps, [(ref_ema, ref)])
    return ref, ref_ema.state_dict()


def _check_average(ema_sd, want_sd, what):
    assert set(ema_sd) == set(want_sd), f"{what}: keys {sorted(ema_sd)} != {sorted(want_sd)}"
    for n, w in want_sd.items():
        v = ema_sd[n]
        got = v.full_tensor() if isinstance(v, DTensor) else v
        assert torch.equal(got, w), f"{what}: {n} differs from single-process ModelEMA"


def scenario_model_ema(rank, world, ckpt_dir):
    from torch.distributed.checkpoint import save
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    mesh = init_device_mesh("cpu", (world,))
    ref, want = _reference_ema(3)
    model, ddp = _mlp(), DistributedDataParallel(_mlp())
    fully_shard(model, mesh=mesh)
    ema = ntkcl_fast.ModelEMA(model, decay=0.8, use_warmup=True)
    ema_ddp = ntkcl_fast.ModelEMA(ddp, decay=0.8, use_warmup=True)
    _train_steps(_mlp(), [model, ddp], 3, [(ema, model), (ema_ddp, ddp)])
    _check_average(ema.state_dict(), want, "FSDP2")
    _check_average(ema_ddp.state_dict(), want, "DDP")
    local = sum(t.numel() for t in ema.state_dict().values() if isinstance(t, DTensor) for t in [t.to_local()])
    assert local == sum(p.to_local().numel() for p in model.parameters()), "the average is not the local shards"
    if world > 1:
        assert local < sum(p.numel() for p in model.parameters()), "the average holds more than a shard"

    x = _full((4, 5), torch.float32, 7)
    for m, e in [(model, ema), (ddp, ema_ddp)]:
        m.eval()
        trained = [t.full_tensor() if isinstance(t, DTensor) else t.clone() for t in m.state_dict().values()]
        with e.average_parameters(m):
            _check_average({k.removeprefix("module."): v for k, v in m.state_dict().items()},
                           {k.removeprefix("module."): v for k, v in want.items()}, "average_parameters")
            with torch.no_grad():
                m(x)
        for t, w in zip(m.state_dict().values(), trained):
            assert torch.equal(t.full_tensor() if isinstance(t, DTensor) else t, w), "not restored exactly"
    ema_ddp.copy_to(ddp)
    _check_average({"module." + k: v for k, v in ddp.module.state_dict().items()}, want, "copy_to DDP")
    if ckpt_dir:
        save({"ema": ema.state_dict()}, checkpoint_id=ckpt_dir)


def scenario_dcp_load(rank, world, ckpt_dir):
    from torch.distributed.checkpoint import load
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    _, want = _reference_ema(3)
    model = _mlp()
    fully_shard(model, mesh=mesh)
    ema = ntkcl_fast.ModelEMA(model, decay=0.8)
    state = {"ema": ema.state_dict()}
    load(state, checkpoint_id=ckpt_dir)
    ema.load_state_dict(state["ema"])
    _check_average(ema.state_dict(), want, f"DCP load at world {world}")


SCENARIOS = {"ops": scenario_ops, "model_ema": scenario_model_ema, "dcp_load": scenario_dcp_load}


def _scenario(name: str):
    """A scenario of this file by name, or `module:function` for one kept beside its test."""
    if ":" not in name:
        return SCENARIOS[name]
    import importlib
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def main():
    # an abort in C++ (seen once: "terminate called without an active exception", nothing else)
    # then prints where each thread's Python was, so the failure says which step it came from
    faulthandler.enable()
    scenario, rank, world, rendezvous, *rest = sys.argv[1:]
    os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=int(rank), world_size=int(world))
    try:
        _scenario(scenario)(int(rank), int(world), *rest)
        # FSDP2 and DDP modules live in reference cycles; collect them now, while the group they
        # hold is alive, rather than in the interpreter's teardown after it is destroyed
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check has passed and the group is shut down. What is left is the interpreter's own
    # teardown of torch's C++ state, which is not under test; leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
