"""EWC helper: parameter selection, L2-SP, Fisher modes vs hand-written loops, and each
`convention=` against a re-implementation of that library's formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from ntkcl_fast import _backend
from ntkcl_fast.ewc import EWC

from ._helpers import compiled

torch.set_default_dtype(torch.float32)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _batches(seed, n=3, bs=4):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (bs,), generator=gen))
            for _ in range(n)]


def _perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- re-implementations

def _minibatch_grad_sq(model, batches, labels="true", weight=None):
    """sum over batches of (gradient of the mean CE)^2 * weight(batch)."""
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        model.zero_grad()
        logits = model(x)
        target = logits.max(1)[1].flatten() if labels == "argmax" else y
        nnf.cross_entropy(logits, target).backward()
        for n, p in params.items():
            out[n] += p.grad ** 2 * (weight(x) if weight else 1.0)
    return out


def avalanche_importance(model, batches):
    imp = _minibatch_grad_sq(model, batches)
    return {n: v / float(len(batches)) for n, v in imp.items()}


def pycil_fisher(model, batches, fishermax=0.0001):
    fisher = _minibatch_grad_sq(model, batches)
    return {n: torch.min(v / len(batches), torch.tensor(fishermax, dtype=v.dtype)) for n, v in fisher.items()}


def mammoth_fish(model, batches):
    fish = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    logsoft = torch.nn.LogSoftmax(dim=1)
    for inputs, labels in batches:
        for ex, lab in zip(inputs, labels):
            model.zero_grad()
            output = model(ex.unsqueeze(0))
            loss = -nnf.nll_loss(logsoft(output), lab.unsqueeze(0), reduction="none")
            exp_cond_prob = torch.mean(torch.exp(loss.detach().clone()))
            torch.mean(loss).backward()
            for n, p in model.named_parameters():
                fish[n] += exp_cond_prob * p.grad ** 2
    return {n: v / (len(batches) * batches[0][0].shape[0]) for n, v in fish.items()}


def clb_importance(model, batches, start=None):
    imp = _minibatch_grad_sq(model, batches, labels="argmax", weight=lambda x: len(x) / len(batches))
    if start is not None:
        imp = {n: v + start[n] for n, v in imp.items()}
    return imp


def _penalty(model, terms, lam, half=False):
    total = 0.0
    for anchors, imp in terms:
        for n, p in model.named_parameters():
            total = total + (imp[n] * (p - anchors[n]) ** 2).sum()
    return lam * (0.5 if half else 1.0) * total


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _as_dict(ewc, tensors):
    return dict(zip(ewc.names, tensors))


# ---------------------------------------------------------------- conventions

@pytest.mark.parametrize("mode", ["separate", "online"])
def test_avalanche_convention(mode):
    model = _model()
    ewc = EWC(model, lam=0.7, convention="avalanche", mode=mode, decay=0.5)
    b1, b2 = _batches(1), _batches(2)
    imp1, anc1 = avalanche_importance(model, b1), _snapshot(model)
    ewc.consolidate(b1)
    _perturb(model, 3)
    imp2, anc2 = avalanche_importance(model, b2), _snapshot(model)
    ewc.consolidate(b2)
    _perturb(model, 4)
    if mode == "separate":
        terms = [(anc1, imp1), (anc2, imp2)]
    else:  # decay_factor * old + new; only the last anchor
        terms = [(anc2, {n: 0.5 * imp1[n] + imp2[n] for n in imp1})]
    for (a, f), (mine_a, mine_f) in zip(terms, ewc.terms):
        for n in ewc.names:
            _close(_as_dict(ewc, mine_f)[n], f[n])
            _close(_as_dict(ewc, mine_a)[n], a[n])
    _close(ewc.penalty(), _penalty(model, terms, 0.7))


def test_pycil_convention():
    model = _model()
    ewc = EWC(model, lam=1000.0, convention="pycil")
    b1, b2 = _batches(1), _batches(2)
    f1 = pycil_fisher(model, b1)
    ewc.consolidate(b1)
    _perturb(model, 3)
    alpha = 3 / 6  # known classes / total classes
    new = pycil_fisher(model, b2)
    merged = {n: alpha * f1[n] + (1 - alpha) * new[n] for n in new}
    mean = _snapshot(model)
    ewc.consolidate(b2, decay=alpha)
    assert any((f == 1e-4).any() for f in f1.values())  # the clamp is exercised
    for n in ewc.names:
        _close(_as_dict(ewc, ewc.terms[0][1])[n], merged[n])
    _perturb(model, 4)
    # PyCIL: loss += lamda * sum(fisher * (p - mean)^2) / 2
    want = 1000.0 * sum((merged[n] * (p - mean[n]).pow(2)).sum() / 2 for n, p in model.named_parameters())
    _close(ewc.penalty(), want)


def test_mammoth_convention():
    model = _model()
    ewc = EWC(model, lam=3.0, convention="mammoth", decay=0.8)
    b1, b2 = _batches(1), _batches(2)
    fish1 = mammoth_fish(model, b1)
    ewc.consolidate(b1)
    _perturb(model, 3)
    fish2 = mammoth_fish(model, b2)
    ewc.consolidate(b2)
    fish = {n: fish1[n] * 0.8 + fish2[n] for n in fish1}  # fish *= gamma; fish += new
    checkpoint = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    _perturb(model, 4)
    flat_fish = torch.cat([fish[n].reshape(-1) for n, _ in model.named_parameters()])
    flat = torch.cat([p.reshape(-1) for p in model.parameters()])  # mammoth's get_params()
    want = 3.0 * (flat_fish * ((flat - checkpoint) ** 2)).sum()
    _close(ewc.penalty(), want)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_clb_convention(mode):
    model = _model()
    ewc = EWC(model, lam=0.25, convention="clb", mode=mode)
    b1, b2 = _batches(1), _batches(2, n=2, bs=5)
    imp1, anc1 = clb_importance(model, b1), _snapshot(model)
    ewc.consolidate(b1)
    _perturb(model, 3)
    anc2 = _snapshot(model)
    imp2 = clb_importance(model, b2, start=imp1 if mode == "online" else None)
    ewc.consolidate(b2)
    _perturb(model, 4)
    terms = [(anc1, imp1), (anc2, imp2)] if mode == "separate" else [(anc2, imp2)]
    _close(ewc.penalty(), _penalty(model, terms, 0.25))


# ---------------------------------------------------------------- Fisher modes vs a per-sample loop

def _per_sample_loop(model, batches, labels):
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        for xi, yi in zip(x, y):
            logits = model(xi.unsqueeze(0))
            probs = logits.softmax(-1)[0].detach()
            if labels == "expected":
                classes, weights = list(range(logits.shape[-1])), probs.tolist()
            elif labels == "argmax":
                classes, weights = [int(logits.argmax())], [1.0]
            else:
                classes, weights = [int(yi)], [1.0]
            for c, w in zip(classes, weights):
                model.zero_grad()
                torch.log_softmax(model(xi.unsqueeze(0)), -1)[0, c].backward()
                for n, p in params.items():
                    out[n] += w * p.grad ** 2
    return {n: v / len(batches) for n, v in out.items()}


@pytest.mark.parametrize("labels", ["true", "argmax", "expected"])
def test_per_sample_fisher_matches_a_hand_written_loop(labels):
    model = _model()
    batches = _batches(5)
    ewc = EWC(model, labels=labels, per_sample=True)
    fisher = ewc.consolidate(batches)
    want = _per_sample_loop(model, batches, labels)
    for n, f in zip(ewc.names, fisher):
        _close(f, want[n])


@pytest.mark.parametrize("labels", ["true", "argmax"])
def test_minibatch_fisher_matches_a_hand_written_loop(labels):
    model = _model()
    batches = _batches(6)
    ewc = EWC(model, labels=labels)
    fisher = ewc.consolidate(batches)
    want = _minibatch_grad_sq(model, batches, labels=labels)
    for n, f in zip(ewc.names, fisher):
        _close(f, want[n] / len(batches))


# ---------------------------------------------------------------- selection, L2-SP, gradients

def test_select_by_regex_and_l2sp_anchor():
    model = _model()
    ewc = EWC(model, params=r"^2\.", lam=2.0)
    assert ewc.names == ["2.weight", "2.bias"]
    assert ewc.penalty().item() == 0.0
    ewc.anchor_to_current()
    anchors = _snapshot(model)
    _perturb(model, 7)
    want = 2.0 * sum(((p - anchors[n]) ** 2).sum() for n, p in model.named_parameters() if n.startswith("2."))
    value = ewc.penalty()
    _close(value, want)
    value.backward()
    assert model[0].weight.grad is None
    _close(model[2].weight.grad, 4.0 * (model[2].weight - anchors["2.weight"]).detach())


def test_penalty_grad_matches_autograd_of_penalty():
    model = _model()
    ewc = EWC(model, lam=0.5)
    ewc.consolidate(_batches(1))
    _perturb(model, 2)
    ewc.consolidate(_batches(2))
    _perturb(model, 3)
    value = ewc.penalty()
    value.backward()
    want = [p.grad.clone() for p in ewc.parameters()]
    model.zero_grad(set_to_none=True)
    value2 = ewc.penalty_grad_()
    _close(value2, value.detach())
    for p, w in zip(ewc.parameters(), want):
        _close(p.grad, w)


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="convention"):
        EWC(model, convention="ewc++")
    with pytest.raises(ValueError, match="params"):
        EWC(model, params=r"nothing")
    with pytest.raises(TypeError, match=r"params\[1\]"):
        EWC(model, params=[r"0\.", 3])
    with pytest.raises(ValueError, match="params is not a valid regular expression"):
        EWC(model, params="[")
    with pytest.raises(ValueError, match=r"params\[1\] is not a valid regular expression"):
        EWC(model, params=[r"0\.", "(?"])
    with pytest.raises(ValueError, match="mode"):
        EWC(model, mode="both")
    with pytest.raises(ValueError, match="labels"):
        EWC(model, labels="soft")
    with pytest.raises(ValueError, match="per_sample"):
        EWC(model, labels="expected", per_sample=False)
    with pytest.raises(ValueError, match="batches"):
        EWC(model).consolidate([])


def test_l2sp_term_is_kept_apart_from_online_fisher():
    model = _model()
    ewc = EWC(model, mode="online", decay=0.5, lam=1.0)
    ewc.anchor_to_current(importance=2.0)
    pre = _snapshot(model)
    fisher = ewc.consolidate(_batches(1))
    after = _snapshot(model)
    _perturb(model, 9)
    want = sum((2.0 * (p - pre[n]) ** 2).sum() + (dict(zip(ewc.names, fisher))[n] * (p - after[n]) ** 2).sum()
               for n, p in model.named_parameters())
    _close(ewc.penalty(), want)
    assert len(ewc.terms) == 1


def test_frozen_parameters_are_not_selected():
    model = _model()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in EWC(model).names
    assert EWC(model, params=r"^0\.").names == ["0.bias"]


_BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(_backend._C is None, reason="extension not built")),
             pytest.param("triton", marks=pytest.mark.skipif(_backend.unavailable_reason("triton", "cpu", "l2_penalty")
                                                             is not None, reason="triton unavailable"))]


@pytest.mark.parametrize("backend", _BACKENDS)
def test_bf16_model_with_fp32_fisher(backend):
    model = _model().to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in _batches(1)]
    ewc = EWC(model, lam=10.0, backend=backend)
    fisher = ewc.consolidate(batches)
    assert all(f.dtype == torch.float32 for f in fisher)
    assert all(a.dtype == torch.bfloat16 for a in ewc.terms[0][0])
    _perturb(model, 2)
    value = ewc.penalty()
    value.backward()
    want = [p.grad.clone() for p in ewc.parameters()]
    model.zero_grad(set_to_none=True)
    value2 = ewc.penalty_grad_()
    assert torch.equal(value.detach(), value2)
    for p, w in zip(ewc.parameters(), want):
        assert p.grad.dtype == torch.bfloat16
        assert torch.equal(p.grad, w)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_penalty_and_penalty_grad_compile_to_eager(backend):
    model = _model()
    ewc = EWC(model, lam=0.5, backend=backend)
    ewc.anchor_to_current(importance=0.25)
    ewc.consolidate(_batches(1))
    _perturb(model, 4)
    ewc.consolidate(_batches(2))  # separate mode: each param appears once per term
    _perturb(model, 5)
    results = []
    for wrap in (lambda f: f, compiled):
        model.zero_grad(set_to_none=True)
        value = wrap(ewc.penalty)()
        value.backward()
        from_backward = [p.grad.clone() for p in ewc.parameters()]
        model.zero_grad(set_to_none=True)
        value2 = wrap(ewc.penalty_grad_)()
        results.append([value.detach(), value2] + from_backward + [p.grad for p in ewc.parameters()])
    for a, b in zip(*results):
        if backend == "torch":  # the reference, which inductor fuses and may round differently
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)


# ---------------------------------------------------------------- a growing classifier head

def _avalanche_expand(t, shape):
    """Avalanche's `ParamData.expand` with its default zeros padding (one growing dimension)."""
    grown = [i for i, (new, old) in enumerate(zip(shape, t.shape)) if new > old]
    if not grown:
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    out[[slice(n) if i != grown[0] else slice(t.shape[i]) for i, n in enumerate(shape)]] = t
    return out


def _grow_head(model, classes, seed):
    """Replace the last Linear by one with more outputs, keeping the old rows (IncrementalClassifier)."""
    old = model[2]
    torch.manual_seed(seed)
    new = torch.nn.Linear(old.in_features, classes).double()
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    model[2] = new


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_avalanche_head_growth_pads_importance_with_zeros(mode):
    model = _model()
    ewc = EWC(model, lam=0.7, convention="avalanche", mode=mode, decay=0.5)
    b1 = _batches(1)
    imp1, anc1 = avalanche_importance(model, b1), _snapshot(model)
    ewc.consolidate(b1)
    _grow_head(model, 5, seed=9)
    _perturb(model, 3)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    grown = [tuple({n: _avalanche_expand(v, shapes[n]) for n, v in d.items()} for d in (anc1, imp1))]
    _close(ewc.penalty(), _penalty(model, grown, 0.7))
    b2 = [(x, y + 2) for x, y in _batches(2)]  # the new classes
    imp2, anc2 = avalanche_importance(model, b2), _snapshot(model)
    ewc.consolidate(b2)
    _perturb(model, 4)
    if mode == "separate":
        terms = grown + [(anc2, imp2)]
    else:
        terms = [(anc2, {n: 0.5 * grown[0][1][n] + imp2[n] for n in imp2})]
    _close(ewc.penalty(), _penalty(model, terms, 0.7))
    for p in model.parameters():
        p.grad = None
    want = torch.autograd.grad(_penalty(model, terms, 0.7), list(model.parameters()))
    ewc.penalty_grad_()
    for p, g in zip(model.parameters(), want):
        _close(p.grad, g)


def test_head_shrink_or_reshape_raises_naming_the_parameter():
    model = _model()
    ewc = EWC(model)
    ewc.consolidate(_batches(1))
    model[2] = torch.nn.Linear(8, 2).double()
    with pytest.raises(ValueError, match=r"'2\.weight' changed shape"):
        ewc.penalty()
