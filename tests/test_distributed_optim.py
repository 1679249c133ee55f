"""AdamR and EWC on FSDP2-sharded models at world sizes 1, 2 and 3 (gloo, CPU), against the same
optimizer / regularizer on the unsharded model in the same rank. The `scenario_*` functions run
in every rank (launched through tests/_dist_worker.py); the tests below launch them."""
from __future__ import annotations

import pytest
import torch

from .test_distributed import launch, pytestmark  # noqa: F401  (pytestmark: skip without gloo)

STEPS = 3


# ------------------------------------------------------------------------------ rank side

def _model(dtype):
    torch.manual_seed(0)  # weight rows 7 and 2: uneven shards at world 2 and 3, an empty one at 3
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2)).to(dtype)


def _recording(fn, seen):
    def record(*args, **kwargs):
        value = fn(*args, **kwargs)
        seen.append(value.clone())
        return value
    return record


def _adamr_case(mesh, dtype, backend, hyper):
    """K steps of AdamR on an FSDP2 model (plus one replicated DTensor param) and on its unsharded
    twin, with the same gradients. The twin steps with the sharded run's V, so every param and
    moment must match bit for bit; its own V must equal that V within fp64 summation rounding."""
    from unittest import mock

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    from ntkcl_fast import AdamR
    from ntkcl_fast.adamr import _dtensor

    from ._dist_worker import _equal, _full, _same_on_every_rank

    ref, model = _model(dtype), _model(dtype)
    fully_shard(model, mesh=mesh)
    extra = _full((3, 2), dtype, 77)
    ref_params = [list(ref[0].parameters()), list(ref[1].parameters()) + [torch.nn.Parameter(extra.clone())]]
    params = [list(model[0].parameters()), list(model[1].parameters())
              + [torch.nn.Parameter(distribute_tensor(extra.clone(), mesh, [Replicate()]))]]
    groups = [dict(pull=0.3, weight_decay=0.01), dict(pull=0.2, pull_norm="l1", amsgrad=True, lr=2e-2)]

    def make(ps):
        return AdamR([dict(params=p, **g) for p, g in zip(ps, groups)], lr=1e-2, betas=(0.8, 0.9), eps=1e-6,
                     backend=backend, **hyper)
    ref_opt, opt = make(ref_params), make(params)
    flat_ref = [p for ps in ref_params for p in ps]
    flat = [p for ps in params for p in ps]
    n = sum(p.numel() for p in flat_ref)
    # V sums n non-negative fp64 terms; two summation orders each err by at most (n - 1) * 2**-53
    # relative, so they differ by less than 2 * n * 2**-53
    v_rtol = 2 * n * 2.0 ** -53
    v_seen, ref_v = [], []
    ref_v_mean = ref_opt._v_mean

    def v_from_sharded(plans, calls):
        ref_v.append(ref_v_mean(plans, calls))
        return v_seen[len(ref_v) - 1]
    ref_opt._v_mean = v_from_sharded

    needs_v = hyper.get("pull_scale", "stable") == "stable"
    for k in range(STEPS):
        for i, (r, p) in enumerate(zip(flat_ref, flat)):
            g = _full(r.shape, dtype, 1000 * k + i)
            r.grad = g.clone()
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as calls, \
                mock.patch.object(_dtensor, "v_mean", _recording(_dtensor.v_mean, v_seen)):
            opt.step()
        assert calls.call_count == int(needs_v), f"step {k} made {calls.call_count} all_reduce calls"
        ref_opt.step()
        what = f"AdamR {dtype} {backend} {hyper} step {k}"
        if needs_v:
            _same_on_every_rank(v_seen[k], what + " V")
            torch.testing.assert_close(v_seen[k], ref_v[k], rtol=v_rtol, atol=0, msg=what + " V")
        for i, (r, p) in enumerate(zip(flat_ref, flat)):
            _equal(p, r.detach(), f"{what} param [{i}]")
            for key, want in ref_opt.state[r].items():
                got = opt.state[p][key]
                if key == "step":
                    assert torch.equal(got, want), f"{what} step count [{i}]"
                else:
                    assert tuple(got.placements) == tuple(p.placements), f"{what} {key} [{i}] placements"
                    _equal(got, want, f"{what} {key} [{i}]")
    local = sum(opt.state[p][key].to_local().numel() for p in flat for key in ("exp_avg", "anchor"))
    assert local == 2 * sum(p.to_local().numel() for p in flat), "the state is not the local shards"
    assert all(isinstance(opt.state[p]["exp_avg_sq"], DTensor) for p in flat)


def _adamr_errors(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ntkcl_fast import AdamR

    a = torch.nn.Parameter(distribute_tensor(torch.randn(6, 2), mesh, [Shard(0)]))
    b = torch.nn.Parameter(torch.randn(6, 2))
    cases = [([a, b], lambda: None, r"param_groups\[0\]\.params\[1\] is a plain Tensor")]
    if mesh.size() > 1:  # a grad placed otherwise than its param (Replicate equals Shard at world 1)
        c = torch.nn.Parameter(distribute_tensor(torch.randn(6, 2), mesh, [Shard(0)]))
        cases.append(([a, c], lambda: setattr(c, "grad", distribute_tensor(torch.randn(6, 2), mesh, [Replicate()])),
                      r"param_groups\[0\]\.params\[1\]\.grad"))
    import re
    for ps, setup, match in cases:
        opt = AdamR(ps, pull=0.1)
        for p in ps:
            p.grad = torch.ones_like(p)
        setup()
        before = [p.detach().clone() for p in ps]
        try:
            opt.step()
        except ValueError as e:
            assert re.search(match, str(e)), f"message {e!r} does not name {match}"
        else:
            raise AssertionError(f"no ValueError for {match}")
        assert all(torch.equal(p.detach(), q) for p, q in zip(ps, before)), "a failed step wrote"


def _adamr_cases(mesh):
    for backend in ("torch", "cpu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            _adamr_case(mesh, dtype, backend, {})
        _adamr_case(mesh, torch.float32, backend, dict(pull_scale="lr"))
    _adamr_errors(mesh)


def _batches(rank, world, seed, sizes=(2, 3)):
    """(global batches for the single-process run, this rank's parts of them)."""
    full, part = [], []
    for b, n in enumerate(sizes):
        x = _full_x((world * n, 5), seed + b)
        y = torch.arange(world * n) % 2
        full.append((x, y))
        part.append((x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]))
    return full, part


def _full_x(shape, seed):
    from ._dist_worker import _full
    return _full(shape, torch.float64, seed)


def _set_params(ref, model, seed):
    from torch.distributed.tensor import distribute_tensor
    with torch.no_grad():
        for i, (r, p) in enumerate(zip(ref.parameters(), model.parameters())):
            full = _full_x(r.shape, seed + i)
            r.copy_(full)
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())


# fp64 models: the sharded gradients (so the Fisher) differ from the single-process ones only in
# how each batch sums its samples' O(1) terms (per rank, then FSDP2's average over the ranks): a
# few fp64 ulps of 1 (2.2e-16) where terms cancel, a few relative ulps elsewhere (seen: 4.4e-16)
EWC_TOL = dict(rtol=1e-12, atol=1e-14)
# the penalty's value is fp32 and sums in another order (shards, then the all-reduce): as in the
# DTensor l2_penalty test, a few fp32 ulps
PENALTY_TOL = dict(rtol=1e-6, atol=0)


def _close(dt, want, what):
    from torch.distributed.tensor import DTensor
    assert isinstance(dt, DTensor), f"{what}: not a DTensor"
    torch.testing.assert_close(dt.full_tensor(), want, **EWC_TOL, msg=lambda m: f"{what}: {m}")


def _ewc_case(rank, world, mesh, kwargs):
    from torch.distributed.fsdp import fully_shard

    from ntkcl_fast import EWC

    from ._dist_worker import _equal, _same_on_every_rank

    ref, model = _model(torch.float64), _model(torch.float64)
    fully_shard(model, mesh=mesh)
    ref_ewc, ewc = EWC(ref, lam=0.7, **kwargs), EWC(model, lam=0.7, **kwargs)
    what = f"EWC {kwargs}"
    for e in (ref_ewc, ewc):
        e.anchor_to_current(importance=0.5)
    for task in range(2):
        _set_params(ref, model, 100 * task)
        full, part = _batches(rank, world, 10 * task)
        want = ref_ewc.consolidate(full)
        got = ewc.consolidate(part)
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{what} task {task} Fisher [{i}]")
    assert len(ewc.terms) == len(ref_ewc.terms)
    for (anchors, fisher), (ref_anchors, _) in zip(ewc.terms, ref_ewc.terms):
        for i, (a, w) in enumerate(zip(anchors, ref_anchors)):
            _equal(a, w, f"{what} anchor [{i}]")
        local = sum(t.to_local().numel() for t in anchors + fisher)
        assert local == 2 * sum(p.to_local().numel() for p in ewc.parameters()), "the terms are not local shards"

    _set_params(ref, model, 500)
    want = ref_ewc.penalty()
    got = ewc.penalty()
    torch.testing.assert_close(got, want, **PENALTY_TOL, msg=lambda m: f"{what} penalty: {m}")
    _same_on_every_rank(got, what + " penalty")
    # a training step: the task loss through FSDP2's backward, the penalty on the sharded params
    full, part = _batches(rank, world, 900, sizes=(2,))
    torch.nn.functional.cross_entropy(ref(full[0][0]), full[0][1]).add(want).backward()
    torch.nn.functional.cross_entropy(model(part[0][0]), part[0][1]).add(got).backward()
    for i, (p, r) in enumerate(zip(model.parameters(), ref.parameters())):
        _close(p.grad, r.grad, f"{what} training grad [{i}]")
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
    want, got = ref_ewc.penalty_grad_(), ewc.penalty_grad_()
    torch.testing.assert_close(got, want, **PENALTY_TOL, msg=lambda m: f"{what} penalty_grad_: {m}")
    for i, (p, r) in enumerate(zip(ewc.parameters(), ref_ewc.parameters())):
        _close(p.grad, r.grad, f"{what} penalty_grad_ [{i}]")


def _ewc_errors(rank, world, mesh):
    from torch.distributed.fsdp import fully_shard

    from ._dist_worker import _each_raises

    from ntkcl_fast import EWC

    model = _model(torch.float64)
    fully_shard(model, mesh=mesh)
    ewc = EWC(model, per_sample=True, convention="mammoth")
    cases = [(lambda: ewc.consolidate(_batches(rank, world, 0)[1]), NotImplementedError, "per_sample")]
    if world > 1:  # rank 0's part of batch 1 has one sample more
        ewc2 = EWC(model)
        part = _batches(rank, world, 0)[1]
        if rank == 0:
            part[1] = (torch.cat([part[1][0], part[1][0][:1]]), torch.cat([part[1][1], part[1][1][:1]]))
        cases.append((lambda: ewc2.consolidate(part), ValueError, "batch 1 has 3 to 4 samples"))
    _each_raises(cases)
    assert not ewc.terms and (world == 1 or not ewc2.terms), "a failed consolidation kept a term"
    assert all(p.grad is None for p in model.parameters()), "consolidation left gradients behind"


def _ewc_cases(rank, world, mesh):
    for kwargs in (dict(), dict(convention="pycil", fisher_max=1e-2), dict(convention="clb"),
                   dict(convention="mammoth", per_sample=False, params=r"^1\.")):
        _ewc_case(rank, world, mesh, kwargs)
    _ewc_errors(rank, world, mesh)


def scenario_optim(rank, world):
    """One launch per world size for both: starting the ranks costs more than the cases."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    _adamr_cases(mesh)
    _ewc_cases(rank, world, mesh)


# ------------------------------------------------------------------------------ launches

@pytest.mark.parametrize("world", [1, 2, 3])
def test_adamr_and_ewc_on_fsdp2_equal_single_process(world):
    launch("tests.test_distributed_optim:scenario_optim", world)
