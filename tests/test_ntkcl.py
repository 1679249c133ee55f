"""NTK-CL pipeline: fused vs eager step parity, EMA of the PEFT modules, prototypes, metrics, demo."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ntkcl_fast import ModelEMA
from ntkcl_fast.ntkcl import NTKCL, NTKCLConfig, VisionTransformer, metrics
from ntkcl_fast.reference import ortho_eager as eager

from ._helpers import assert_within_budget, assert_within_budget_of_sum


def tiny_vit(width=32, depth=2):
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=width, depth=depth, num_heads=4,
                             mlp_ratio=2.0)


def randomize_peft(learner, scale=0.05):
    with torch.no_grad():
        for p in list(learner.peft.parameters()) + list(learner.fusion.parameters()):
            p.add_(torch.randn_like(p) * scale)


def batch(n=12, classes=(0, 1)):
    x = torch.rand(n, 1, 8, 8)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return x, y[torch.randperm(n)]


def learner_at_task_1(**cfg):
    """A learner that finished task 0 (classes 0, 1) and began task 1 (classes 2, 3), weights random."""
    torch.manual_seed(0)
    learner = NTKCL(tiny_vit(), NTKCLConfig(dropout=0.0, **cfg))
    learner.begin_task([0, 1])
    randomize_peft(learner)
    learner.end_task([batch()])
    learner.begin_task([2, 3])
    randomize_peft(learner)  # away from the L2 anchors
    return learner


def test_vit_has_timm_parameter_names():
    names = set(tiny_vit(depth=1).state_dict())
    for n in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
              "norm.weight"):
        assert n in names


@pytest.mark.parametrize("residual", ["signed_sum", "sumsq", "projection"])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_fused_step_matches_eager(residual, sign):
    base = learner_at_task_1(residual=residual, contrastive_sign=sign)
    x, y = batch(12, (2, 3))

    def step(fused, dtype):
        m = in_dtype(base, dtype)
        m.cfg.fused = fused
        m.train()
        torch.manual_seed(1)  # same old-prototype sample
        loss, parts = m.loss(x.to(dtype), y)
        loss.backward()
        return loss.detach(), parts, [p.grad for p in m.trainable_parameters()]

    ref_loss, ref_parts, ref_grads = step(False, torch.float64)
    eager_loss, _, eager_grads = step(False, torch.float32)
    fused_loss, _, fused_grads = step(True, torch.float32)
    assert all(math.isfinite(float(v.detach())) for v in ref_parts.values())
    parts = {k: float(v.detach()) for k, v in ref_parts.items()}
    assert parts["reg"] > 0 and parts["nce"] != 0 and parts["dis"] != 0
    assert_within_budget(fused_loss, ref_loss, eager_loss, what="loss")
    assert len(ref_grads) == len(fused_grads)
    n_nonzero = 0
    for i, (g, ge, gr) in enumerate(zip(fused_grads, eager_grads, ref_grads)):
        assert (g is None) == (gr is None), f"grad {i}"
        if g is None:
            continue
        n_nonzero += int(gr.abs().max() > 0)
        assert_within_budget(g, gr, ge, what=f"grad {i} {tuple(g.shape)}")
    assert n_nonzero > 0


def in_dtype(learner, dtype):
    m = copy.deepcopy(learner).to(dtype)
    m.anchors = [a.to(dtype) for a in m.anchors]
    return m


def test_regularizer_terms_fused_match_eager():
    learner = learner_at_task_1()
    feats = [torch.randn(10, learner.feature_dim, dtype=torch.float64) for _ in range(3)]
    index = torch.tensor([2, 3] * 5)
    learner64 = in_dtype(learner, torch.float64)
    torch.manual_seed(2)
    ref = learner64.regularizers(*feats, index, fused=False)
    torch.manual_seed(2)
    eager = learner.regularizers(*[f.float() for f in feats], index, fused=False)
    torch.manual_seed(2)
    fused = learner.regularizers(*[f.float() for f in feats], index, fused=True)
    for k in ("nce", "reg"):
        assert_within_budget(fused[k].detach().float(), ref[k].detach(), eager[k].detach().float(), what=k)
    # dis is the signed sum of the residual elements of f_ch and f_pa, about 1 in size from terms
    # whose absolute sum is about 60: its rounding error scales with the terms, not with the value
    normalized = [torch.nn.functional.normalize(f, dim=1) for f in feats[:2]]
    terms = torch.cat([(f - f @ learner64.basis @ learner64.basis.T).flatten() for f in normalized])
    assert_within_budget_of_sum(fused["dis"].detach().float(), ref["dis"].detach(), eager["dis"].detach().float(),
                                terms, what="dis")


def test_projection_variant_is_energy_in_old_span():
    f = torch.randn(7, 16, dtype=torch.float64)
    basis = eager.prototype_basis(torch.randn(5, 16, dtype=torch.float64), 5)
    sq = eager.projection_residual(f, basis, reduction="sumsq")
    fn = torch.nn.functional.normalize(f, dim=1)
    torch.testing.assert_close(f.shape[0] - sq, ((fn @ basis) ** 2).sum())


def test_ema_after_tasks_is_mean_of_end_of_task_weights():
    torch.manual_seed(3)
    learner = NTKCL(tiny_vit(depth=1), NTKCLConfig(dropout=0.0))
    ends = []
    n_tasks = 4
    for t in range(n_tasks):
        learner.begin_task([2 * t, 2 * t + 1])
        randomize_peft(learner, scale=0.5)  # stands in for training
        ends.append([p.detach().clone().double() for p in learner.peft.parameters()])
        learner.end_task([batch(6, (2 * t, 2 * t + 1))], last=False)
        assert ModelEMA.task_mean_decay(t) == t / (t + 1)
        mean = [torch.stack(ws).mean(0) for ws in zip(*ends)]
        for e, m in zip(learner.ema.module.parameters(), mean):
            torch.testing.assert_close(e.double(), m, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("after_last", [False, True])
def test_ema_after_last_task_switch(after_last):
    torch.manual_seed(4)
    learner = NTKCL(tiny_vit(depth=1), NTKCLConfig(dropout=0.0, ema_after_last_task=after_last))
    learner.begin_task([0, 1])
    randomize_peft(learner, scale=0.5)
    learner.end_task([batch(6)])
    before = [p.clone() for p in learner.ema.module.parameters()]
    learner.begin_task([2, 3])
    randomize_peft(learner, scale=0.5)
    learner.end_task([batch(6, (2, 3))], last=True)
    changed = any(not torch.equal(a, b) for a, b in zip(before, learner.ema.module.parameters()))
    assert changed == after_last


def test_prototype_refresh_is_class_mean_of_f_mix():
    learner = learner_at_task_1()
    old = learner.prototypes.clone()
    assert torch.all(old[2:] == 0) and torch.all(old[:2].abs().sum(1) > 0)
    data = [batch(9, (2, 3)), batch(5, (2, 3))]
    randomize_peft(learner)
    learner.end_task(data)
    learner.eval()
    with torch.no_grad():
        x = torch.cat([d[0] for d in data])
        y = torch.cat([d[1] for d in data])
        f = learner.features(x)[2].double()
    for c in (2, 3):
        torch.testing.assert_close(learner.prototypes[c].double(), f[y == c].mean(0), rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(learner.prototypes[:2], old[:2], rtol=0, atol=0)
    assert learner.known == 4


def test_predict_uses_reweighted_cosine_to_prototypes():
    learner = learner_at_task_1()
    learner.end_task([batch(8, (2, 3))])
    x, _ = batch(6, (0, 1, 2, 3))
    learner.eval()
    with torch.no_grad():
        f = learner.features(x)[2]
    d = f.shape[1] // 2
    cos = lambda a, b: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    expected = 0.3 * cos(f[:, :d], learner.prototypes[:, :d]) + 0.1 * cos(f[:, d:], learner.prototypes[:, d:])
    torch.testing.assert_close(learner.logits(x), expected)
    assert torch.equal(learner.predict(x), expected.argmax(1))


def test_metrics_on_hand_computed_matrix():
    nan = float("nan")
    acc = np.array([[0.9, nan, nan], [0.7, 0.8, nan], [0.5, 0.6, 0.9]])
    assert metrics.final_accuracy(acc) == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert metrics.average_incremental_accuracy(acc) == pytest.approx((0.9 + 0.75 + (0.5 + 0.6 + 0.9) / 3) / 3)
    # task 0: best before the end 0.9, final 0.5; task 1: 0.8 -> 0.6
    assert metrics.forgetting(acc) == pytest.approx((0.4 + 0.2) / 2)
    assert metrics.forgetting(acc[:1, :1]) == 0.0
    # forgetting uses the best earlier accuracy, not the first one: task 0 peaks at 0.8, ends at 0.3
    assert metrics.forgetting(np.array([[0.6, nan, nan], [0.8, 0.7, nan], [0.3, 0.7, 1.0]])) == pytest.approx(
        (0.5 + 0.0) / 2)
    s = metrics.summary(np.array([[0.5, nan], [0.4, 1.0]]))
    assert s == pytest.approx(dict(A_T=0.7, avg_inc=(0.5 + 0.7) / 2, forgetting=0.1))


def test_demo_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from ntkcl_fast.ntkcl.demo import split_digits
    tasks = split_digits(5, test_fraction=0.3, seed=0)
    assert [t["classes"] for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    target = torch.tensor(load_digits().target)
    total = 0
    for t in tasks:
        for part in ("train", "test"):
            assert set(t[f"y_{part}"].tolist()) == set(t["classes"])
            assert t[f"x_{part}"].shape[1:] == (1, 8, 8) and 0 <= t[f"x_{part}"].min() and t[f"x_{part}"].max() <= 1
        for c in t["classes"]:
            n = int((target == c).sum())
            assert int((t["y_test"] == c).sum()) == round(0.3 * n)
            assert int((t["y_train"] == c).sum()) == n - round(0.3 * n)
        # train and test images of a task are different samples
        tr = {tuple(v.flatten().tolist()) + (int(l),) for v, l in zip(t["x_train"], t["y_train"])}
        te = [tuple(v.flatten().tolist()) + (int(l),) for v, l in zip(t["x_test"], t["y_test"])]
        total += len(t["y_train"]) + len(t["y_test"])
        assert sum(s in tr for s in te) <= 2  # digits holds a few exact duplicate images
    assert total == len(target)
    again = split_digits(5, test_fraction=0.3, seed=0)
    assert all(torch.equal(a["y_test"], b["y_test"]) and torch.equal(a["x_train"], b["x_train"])
               for a, b in zip(tasks, again))


def test_two_task_smoke_run():
    pytest.importorskip("sklearn")
    from ntkcl_fast.ntkcl import demo
    tasks = demo.split_digits(5, seed=0)[:2]
    for t in tasks:  # keep it to seconds
        for part, n in (("train", 40), ("test", 20)):
            t[f"x_{part}"], t[f"y_{part}"] = t[f"x_{part}"][:n], t[f"y_{part}"][:n]
    vit = tiny_vit(width=16, depth=1)
    acc, learner = demo.run_ntkcl(vit, tasks, epochs=1, lr=0.05, seed=0)
    assert acc.shape == (2, 2) and np.isnan(acc[0, 1]) and np.all((acc[np.tril_indices(2)] >= 0) &
                                                                  (acc[np.tril_indices(2)] <= 1))
    assert learner.prototypes.shape == (4, 32) and learner.known == 4
    assert set(learner.predict(tasks[0]["x_test"]).tolist()) <= {0, 1, 2, 3}
    for method in ("finetune", "l2", "ewc"):
        acc = demo.run_baseline(method, vit, tasks, epochs=1, lam=1.0, seed=0)
        assert acc.shape == (2, 2) and not np.isnan(acc[1]).any()
