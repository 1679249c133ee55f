"""NTK-CL step-time breakdown on ViT-B/16 shapes (random weights): forward, backward, each regularizer.

`rows(device, quick)` gives rows in the shape of the EMA rows (op = the phase, list = the model
and batch, impl, baseline, ms, ms_min, reps; `bytes` None, nothing here is bandwidth bound) and
`pct_step`, each phase's share of a whole step. The regularizers are timed forward + backward on
features held fixed (see ntkcl_fast.ntkcl.timing), once with ntkcl_fast's ops (impl
`ntkcl_fast`) and once with the same math in eager PyTorch (baseline column `eager`); "step" is
a whole training step (four ViT passes, fusion, three heads, all terms, backward) with the
fused regularizers against the same step with the eager ones. Target on GPU: the fused
regularizers take <= 2% of the step. On CPU the step runs at batch 1 with 3 timed repeats
(4 in the full GPU run is 64) so that the whole table stays within minutes.

    python bench/bench_ntkcl.py [--device cpu|cuda] [--quick] [--json FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/bench_ntkcl.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import time_ms  # noqa: E402
from ntkcl_fast.ntkcl import NTKCL, NTKCLConfig, VisionTransformer  # noqa: E402


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
    batch = 1 if cpu else (16 if quick else 64)
    # a ViT-B step at batch 1 takes seconds on two CPU cores: few repeats, no time floor
    step_kw = dict(warmup=1, min_reps=2 if quick else 3, min_seconds=0.0) if cpu else dict(min_reps=5 if quick else 20)
    reg_kw = dict(min_reps=5, min_seconds=0.5) if cpu else {}
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

    timed = []  # (phase, impl, baseline column, time_ms dict)
    t_step = time_ms(step(True), device, **step_kw)
    timed.append(("step", "ntkcl_fast regularizers", None, t_step))
    timed.append(("step", "eager regularizers", "eager", time_ms(step(False), device, **step_kw)))
    timed.append(("forward (4 passes + fusion + 3 CE)", "-", None, time_ms(fwd_then_store, device, **step_kw)))
    # backward timed on a fresh graph each repeat
    bwd = []
    for _ in range(step_kw.get("min_reps", 3)):
        fwd_then_store()
        bwd.append(time_ms(backward_only, device, warmup=0, min_reps=1, min_seconds=0.0)["ms"])
    bwd.sort()
    timed.append(("backward (CE only)", "-", None, {"ms": bwd[len(bwd) // 2] if len(bwd) % 2 else
                                                   (bwd[len(bwd) // 2 - 1] + bwd[len(bwd) // 2]) / 2,
                                                   "ms_min": bwd[0], "reps": len(bwd)}))
    with torch.no_grad():
        feats = [f.detach() for f in learner.features(x)]
    index = learner.class_index[y]
    for term, name in (("nce", "contrastive"), ("dis", "projection residual"), ("reg", "L2 anchor")):
        for fused in (True, False):
            t = time_ms(_term_fn(learner, feats, index, term, fused), device, **reg_kw)
            timed.append((f"{name} fwd+bwd", "ntkcl_fast" if fused else "eager", None if fused else "eager", t))
    out = []
    for phase, impl, baseline, t in timed:
        out.append({"op": f"ntkcl {phase}", "list": f"ViT-B/16 batch {batch}", "tensors": None, "elements": None,
                    "dtype": "fp32", "impl": impl, "baseline": baseline, "bytes": None, **t,
                    "pct_step": 100 * t["ms"] / t_step["ms"]})
        print(f"  {phase:40s} {impl:24s} {t['ms']:10.3f} ms  {out[-1]['pct_step']:6.2f}% of step", flush=True)
    learner.cfg.fused = True
    return out


if __name__ == "__main__":
    from bench.run import standalone

    standalone("ntkcl")
