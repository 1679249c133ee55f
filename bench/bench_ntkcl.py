"""NTK-CL step-time breakdown on ViT-B/16 shapes (random weights): forward, backward, each regularizer.

`rows(device, quick)` -> list of dicts (phase, impl, batch, ms, pct_step). The regularizers are
timed forward + backward on features held fixed (see ntkcl_fast.ntkcl.timing), once with
ntkcl_fast's ops (`fused`) and once with the same math in eager PyTorch (`eager`); "step" is a
whole training step (four ViT passes, fusion, three heads, all terms, backward) with the
fused regularizers, and `pct_step` is each phase's share of it. Target on GPU: the fused
regularizers take <= 2% of the step. On CPU a reduced batch keeps the run short.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ntkcl_fast.ntkcl import NTKCL, NTKCLConfig, VisionTransformer


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device, repeats, warmup=1):
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def make_learner(device, *, depth=12, width=768, heads=12, img=224, old_classes=100, new_classes=10):
    """A learner in its second task: random old prototypes, weights away from the L2 anchors."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=img, patch_size=16, embed_dim=width, depth=depth, num_heads=heads)
    learner = NTKCL(vit, NTKCLConfig()).to(device)
    learner.begin_task(range(old_classes))
    with torch.no_grad():
        learner.prototypes.normal_()
        for p in learner.trainable_parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    learner.known = old_classes
    learner.anchors = [p.detach().clone() for p in learner.anchored_parameters()]
    learner.begin_task(range(old_classes, old_classes + new_classes))
    with torch.no_grad():
        for p in learner.anchored_parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return learner.train()


def _term_fn(learner, feats, index, term, fused):
    cfg = learner.cfg
    weight = {"nce": cfg.contrastive_sign * cfg.nce_weight, "dis": cfg.dis_weight, "reg": cfg.reg_weight}[term]

    def fn():
        leaves = [f.clone().requires_grad_(True) for f in feats]
        for p in learner.anchored_parameters():
            p.grad = None
        (weight * learner.regularizers(*leaves, index, fused=fused)[term]).backward()
    return fn


def rows(device: str, quick: bool) -> list[dict]:
    cpu = torch.device(device).type == "cpu"
    batch = (1 if quick else 4) if cpu else (16 if quick else 64)
    repeats = 2 if cpu else (5 if quick else 20)
    learner = make_learner(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.arange(batch, device=device) % 10 + learner.known

    def forward():
        f_ch, f_pa, f_mix = learner.features(x)
        local = learner.class_index[y] - learner.known
        return sum(F.cross_entropy(learner.head(f), local) for f in (f_ch, f_pa, f_mix))

    def step(fused):
        def fn():
            learner.cfg.fused = fused
            for p in learner.trainable_parameters():
                p.grad = None
            loss, _ = learner.loss(x, y)
            loss.backward()
        return fn

    state = {}

    def backward_only():
        state["loss"].backward()
        for p in learner.trainable_parameters():
            p.grad = None

    def fwd_then_store():
        state["loss"] = forward()

    out = []
    t_step = _time_ms(step(True), device, repeats)
    t_fwd = _time_ms(fwd_then_store, device, repeats)
    # backward timed on a fresh graph each repeat
    t_bwd = statistics.median([(_time_ms(fwd_then_store, device, 1, 0), _time_ms(backward_only, device, 1, 0))[1]
                               for _ in range(repeats)])
    with torch.no_grad():
        feats = [f.detach() for f in learner.features(x)]
    index = learner.class_index[y]
    out.append(dict(phase="step (fused regularizers)", impl="fused", batch=batch, ms=t_step))
    out.append(dict(phase="step (eager regularizers)", impl="eager", batch=batch, ms=_time_ms(step(False), device,
                                                                                              repeats)))
    out.append(dict(phase="forward (4 passes + fusion + 3 CE)", impl="-", batch=batch, ms=t_fwd))
    out.append(dict(phase="backward (CE only)", impl="-", batch=batch, ms=t_bwd))
    reg_repeats = 5 if cpu else 50
    for term, name in (("nce", "contrastive"), ("dis", "projection residual"), ("reg", "L2 anchor")):
        for fused in (True, False):
            t = _time_ms(_term_fn(learner, feats, index, term, fused), device, reg_repeats, warmup=2)
            out.append(dict(phase=f"{name} fwd+bwd", impl="fused" if fused else "eager", batch=batch, ms=t))
    for r in out:
        r["pct_step"] = 100 * r["ms"] / t_step
        print(f"  {r['phase']:40s} {r['impl']:6s} {r['ms']:10.3f} ms  {r['pct_step']:6.2f}% of step", flush=True)
    learner.cfg.fused = True
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = rows(args.device, args.quick)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
