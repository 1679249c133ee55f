"""Time of NTK-CL's regularizers (forward + backward) per training step, fused vs eager."""
from __future__ import annotations

import statistics
import time

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def regularizer_time(learner, x: torch.Tensor, y: torch.Tensor, *, fused: bool, repeats: int = 20,
                     warmup: int = 3) -> float:
    """Median seconds of one forward + backward of the weighted regularizer terms.

    The features come from one real forward pass and are then held fixed as leaves, so only the
    regularizers (contrastive, projection residual, L2 anchor) are timed.
    """
    cfg = learner.cfg
    with torch.no_grad():
        feats = [f.detach() for f in learner.features(x)]
    index = learner.class_index[y]
    params = learner.anchored_parameters()
    times = []
    for i in range(warmup + repeats):
        leaves = [f.clone().requires_grad_(True) for f in feats]
        for p in params:
            p.grad = None
        _sync(x.device)
        t0 = time.perf_counter()
        parts = learner.regularizers(*leaves, index, fused=fused)
        total = (cfg.contrastive_sign * cfg.nce_weight * parts["nce"] + cfg.dis_weight * parts["dis"]
                 + cfg.reg_weight * parts["reg"])
        total.backward()
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    for p in params:
        p.grad = None
    return statistics.median(times)
