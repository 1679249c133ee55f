"""AdamR's op contract: opcheck of the extension and Triton ops, `torch.compile(opt.step,
fullgraph=True)` equal to eager and compiled once for every step, version counters, a step that
raises changes nothing, anchors of added groups, step counts of either format."""
from __future__ import annotations

import pytest
import torch

from ntkcl_fast import AdamR, _backend

from ._helpers import assert_bumps_versions, assert_unchanged, compiled, device_backends, snapshot
from ._penalty_samples import adamr_samples, adamr_v_hat_sum_samples

PAIRS = device_backends("adamr_step_")


def _namespaces():
    triton_reason = _backend.unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu",
                                                "adamr_step_")
    return [pytest.param("ntkcl_fast", marks=pytest.mark.skipif(_backend._C is None, reason="extension not built")),
            pytest.param(_backend.TRITON_NAMESPACE, marks=pytest.mark.skipif(triton_reason is not None,
                                                                          reason=str(triton_reason)))]


@pytest.mark.parametrize("namespace", _namespaces())
def test_opcheck(namespace):
    cuda = torch.cuda.is_available() and (namespace != "ntkcl_fast" or _backend.backends()["cuda"])
    device = "cuda" if cuda else "cpu"
    ops = getattr(torch.ops, namespace)
    for args, kwargs in adamr_samples(device):
        torch.library.opcheck(ops.adamr_step_.default, args, kwargs)
    for args, kwargs in adamr_v_hat_sum_samples(device):
        torch.library.opcheck(ops.adamr_v_hat_sum.default, args, kwargs)


def _model_params(device, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(5, 3), (7,), (2, 9)]:
        t = torch.randn(shape[::-1] if strided else shape, generator=gen).to(device)
        out.append(torch.nn.Parameter(t.t() if strided and t.dim() == 2 else t))
    return out


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(50 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _counting_aot_eager(graphs: list):
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return backend


@pytest.mark.parametrize("device,backend", PAIRS)
def test_compiled_step_equals_eager_and_compiles_once(device, backend):
    results, graphs = [], []
    for compile_it in (False, True):
        params = _model_params(device)
        opt = AdamR([{"params": params[:2], "amsgrad": True}, {"params": params[2:], "pull_norm": "l1", "lr": 0.05}],
                    lr=1e-2, weight_decay=0.1, pull=0.3, backend=backend)
        if compile_it:
            torch._dynamo.reset()
            step = torch.compile(opt.step, fullgraph=True, dynamic=False, backend=_counting_aot_eager(graphs))
        else:
            step = opt.step
        for k in range(4):
            _set_grads(params, k)
            step()  # the step count changes every call; the graph must not depend on it
        results.append(([p.detach().clone() for p in params],
                        [opt.state[p][key] for p in params for key in opt.state[p] if key != "anchor"]))
    (p_e, s_e), (p_c, s_c) = results
    assert len(graphs) == 1, f"compiled {len(graphs)} times over 4 steps"
    assert [t.item() for t in s_c if t.dim() == 0] == [4.0] * len(p_c)
    for a, b in zip(p_c + s_c, p_e + s_e):
        if backend == "torch":  # the reference, whose ops a compiler may fuse and round differently
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_compiled_step_with_a_skipped_grad_equals_eager(device, backend):
    results = []
    for compile_it in (False, True):
        params = _model_params(device)
        opt = AdamR(params, lr=1e-2, pull=0.3, backend=backend)
        step = compiled(opt.step) if compile_it else opt.step
        for k in range(3):
            _set_grads(params, k)
            if k == 1:
                params[1].grad = None  # skipped this step: out of V, its step count falls behind
            step()
        results.append(([p.detach().clone() for p in params], [opt.state[p]["step"].item() for p in params]))
    (p_e, n_e), (p_c, n_c) = results
    assert n_c == n_e == [3, 2, 3]
    for a, b in zip(p_c, p_e):
        if backend == "torch":
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_step_bumps_versions_and_autograd_sees_it(device, backend, strided):
    params = _model_params(device, strided=strided)
    opt = AdamR(params, lr=1e-2, pull=0.1, backend=backend)
    _set_grads(params, 0)
    opt.step()
    w = torch.randn(params[0].shape, device=device, requires_grad=True)
    graph = (w * params[0]).sum()  # saves params[0] for backward
    _set_grads(params, 1)
    written = params + [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq", "step")]
    assert_bumps_versions(opt.step, written)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()


def _optimizer_tensors(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p)
            out += [v for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("bad", ["sparse grad", "grad dtype", "backend"])
def test_a_step_that_raises_changes_nothing(device, backend, bad):
    params = _model_params(device)
    extra = torch.nn.Parameter(torch.randn(4, device=device))
    opt = AdamR([{"params": params, "amsgrad": True}, {"params": [extra]}], lr=1e-2, pull=0.1, backend=backend)
    _set_grads(params, 0)
    opt.step()  # params have stepped once, extra not yet
    _set_grads(params, 1)
    if bad == "sparse grad":  # the last parameter of the last group: every other one was checked before
        extra.grad = torch.ones(4, device=device).to_sparse()
        error, message = TypeError, r"param_groups\[1\]\.params\[0\].*sparse"
    elif bad == "grad dtype":
        extra.grad_dtype = None  # torch then lets a grad of another dtype through to the optimizer
        extra.grad = torch.ones(4, device=device, dtype=torch.float64)
        error, message = ValueError, r"param_groups\[1\]\.params\[0\]: grad"
    else:
        extra.grad = torch.ones(4, device=device)
        opt.backend = "cuda" if device == "cpu" else "cpu"
        error, message = RuntimeError, "backend"
    tensors = _optimizer_tensors(opt)
    before = [t.detach().clone() for t in tensors]
    grads = snapshot(params)
    versions = [t._version for t in tensors]
    with pytest.raises(error, match=message):
        opt.step()
    after = _optimizer_tensors(opt)
    assert len(after) == len(tensors)
    for t, b in zip(after, before):
        assert torch.equal(t.detach(), b)  # params, moments, running max, anchors and step counts
    assert_unchanged(params, grads)
    assert versions == [t._version for t in tensors]
    assert [opt.state[p]["step"].item() for p in params + [extra]] == [1, 1, 1, 0]


@pytest.mark.parametrize("device,backend", PAIRS)
def test_added_group_is_anchored_at_its_current_value(device, backend):
    first, later = _model_params(device), torch.nn.Parameter(torch.randn(6, device=device))
    opt = AdamR(first, lr=0.1, pull=1.0, backend=backend)
    opt.add_param_group({"params": [later], "pull": 0.5, "amsgrad": True})
    start = later.detach().clone()
    assert torch.equal(opt.state[later]["anchor"], start)
    assert opt.state[later]["step"].item() == 0 and "max_exp_avg_sq" in opt.state[later]
    with torch.no_grad():
        later.add_(1.0)  # moved away from the anchor before the first step
    later.grad = torch.zeros(6, device=device)
    opt.step()
    # zero gradient: the Adam update is 0 and so is V (1 in its place): only the pull moved it
    torch.testing.assert_close(later.detach(), start + 1.0 - 0.1 * 0.5 * 1.0)


@pytest.mark.parametrize("saved", [7, 7.0, "tensor"], ids=["int", "float", "tensor"])
def test_anchors_given_at_construction_win_and_step_counts_of_either_format_load(saved):
    p = torch.nn.Parameter(torch.randn(3))
    anchor = torch.zeros(3)
    opt = AdamR([p], anchors=[anchor], pull=1.0)
    assert torch.equal(opt.state[p]["anchor"], anchor)
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor(7.0) if saved == "tensor" else saved
    opt.load_state_dict(sd)
    step = opt.state[p]["step"]
    assert isinstance(step, torch.Tensor) and step.dim() == 0 and step.dtype == torch.float32 and step.item() == 7
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"].item() == 8


def test_loading_a_plain_adam_checkpoint_into_amsgrad_starts_the_running_max():
    p = torch.nn.Parameter(torch.randn(3))
    opt = AdamR([p], pull=0.5)
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["amsgrad"] = True
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[p]["max_exp_avg_sq"], torch.zeros(3))
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_amsgrad_switched_on_later_and_a_parameter_put_into_a_group_get_their_state():
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    opt = AdamR([p], pull=0.5)
    opt.param_groups[0]["amsgrad"] = True
    opt.param_groups[0]["params"].append(q)  # not through add_param_group: anchored at its first step
    q_start = q.detach().clone()
    p.grad, q.grad = torch.ones(3), torch.ones(4)
    opt.step()
    assert torch.equal(opt.state[p]["max_exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    assert torch.equal(opt.state[q]["anchor"], q_start) and opt.state[q]["step"].item() == 1
