"""Offline NTK-CL demo on scikit-learn's bundled digits (``python -m ntkcl_fast.ntkcl.demo``).

Class-incremental: 5 tasks of 2 classes (0-1, 2-3, ..., 8-9), a stratified 70/30 train/test
split per class. A small ViT (8x8 images, 2x2 patches, width 64, 3 blocks) is pre-trained in
the script on a label-free pretext task (predicting which of 4 rotations was applied to a
training image), then frozen for NTK-CL and fine-tuned whole for the baselines:

- ``finetune``: plain fine-tuning, a linear head over the classes seen so far;
- ``l2``: the same plus ntkcl_fast.l2_penalty toward the previous task's end weights;
- ``ewc``: the same plus ntkcl_fast.EWC (diagonal Fisher, one term per task);
- ``ntkcl``: NTK-CL (``ntkcl_fast.ntkcl.NTKCL``) with the official loss weights.

Prints the accuracy matrix of each method, A_T, the average incremental accuracy, forgetting,
and the time per step spent in NTK-CL's regularizers with ntkcl_fast's ops vs eager PyTorch;
saves the accuracy matrices as a PNG. CPU only, no download.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import ntkcl_fast
from . import losses
from .metrics import summary
from .model import NTKCL, NTKCLConfig, make_optimizer
from .timing import regularizer_time
from .vit import VisionTransformer

METHODS = ("finetune", "l2", "ewc", "ntkcl")


def split_digits(n_tasks: int = 5, test_fraction: float = 0.3, seed: int = 0) -> list[dict]:
    """Per task: x_train, y_train, x_test, y_test (images [N, 1, 8, 8] in [0, 1]); classes in order."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    classes = sorted(set(y.tolist()))
    per_task = len(classes) // n_tasks
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        task_classes = classes[t * per_task:(t + 1) * per_task]
        tr, te = [], []
        for c in task_classes:
            idx = (y == c).nonzero().squeeze(1)
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_test = int(round(len(idx) * test_fraction))
            te.append(idx[:n_test])
            tr.append(idx[n_test:])
        tr, te = torch.cat(tr), torch.cat(te)
        tasks.append(dict(classes=task_classes, x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te]))
    return tasks


def make_vit(width: int = 64, depth: int = 3) -> VisionTransformer:
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=width, depth=depth, num_heads=4,
                             mlp_ratio=2.0)


def batches(x, y, batch_size, *, shuffle, generator=None):
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        j = order[i:i + batch_size]
        yield x[j], y[j]


def pretrain_rotation(vit: VisionTransformer, images: torch.Tensor, *, epochs: int, seed: int) -> float:
    """Label-free pretext task: which of the 4 rotations (0/90/180/270 degrees) was applied."""
    head = nn.Linear(vit.embed_dim, 4)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    acc = 0.0
    for _ in tqdm(range(epochs), desc="pre-train (rotation)", leave=False):
        correct = total = 0
        for xb, _ in batches(images, torch.zeros(len(images)), 128, shuffle=True, generator=g):
            r = torch.randint(0, 4, (len(xb),), generator=g)
            xr = xb.clone()
            for k in range(1, 4):
                xr[r == k] = torch.rot90(xb[r == k], k, dims=(2, 3))
            logits = head(vit.forward_features(xr))
            loss = F.cross_entropy(logits, r)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == r).sum().item()
            total += len(r)
        acc = correct / total
    return acc


def _accuracy(predict, task) -> float:
    with torch.no_grad():
        return (predict(task["x_test"]) == task["y_test"]).float().mean().item()


def run_baseline(method: str, vit, tasks, *, epochs: int, lam: float, seed: int) -> np.ndarray:
    """Fine-tune the whole ViT and a linear head over the seen classes (class-incremental CE)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(vit).requires_grad_(True)
    n_classes = sum(len(t["classes"]) for t in tasks)
    head = nn.Linear(model.embed_dim, n_classes)
    net = nn.Sequential()
    net.vit, net.head = model, head
    seen = 0
    ewc = (ntkcl_fast.EWC(net, lam=lam, params=r"^vit\.", logits_fn=lambda out: out[:, :seen])
           if method == "ewc" else None)
    anchors = None
    acc = np.full((len(tasks), len(tasks)), np.nan)

    def logits(x):
        return head(model.forward_features(x))[:, :seen]

    for t, task in enumerate(tasks):
        seen += len(task["classes"])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in tqdm(range(epochs), desc=f"{method} task {t}", leave=False):
            for xb, yb in batches(task["x_train"], task["y_train"], 32, shuffle=True, generator=g):
                loss = F.cross_entropy(logits(xb), yb)
                if method == "l2" and anchors is not None:
                    loss = loss + ntkcl_fast.l2_penalty(list(model.parameters()), anchors, lam=lam)
                if ewc is not None and t > 0:
                    loss = loss + ewc.penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
        if method == "l2":
            anchors = [p.detach().clone() for p in model.parameters()]
        if ewc is not None:
            ewc.consolidate([(xb, yb) for xb, yb in batches(task["x_train"], task["y_train"], 32, shuffle=False)])
        for j in range(t + 1):
            acc[t, j] = _accuracy(lambda x: logits(x).argmax(1), tasks[j])
    return acc


def run_ntkcl(vit, tasks, *, epochs: int, lr: float, seed: int, config: NTKCLConfig | None = None):
    """NTK-CL on the frozen pre-trained ViT; returns (accuracy matrix, learner)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    learner = NTKCL(copy.deepcopy(vit), config or NTKCLConfig())
    acc = np.full((len(tasks), len(tasks)), np.nan)
    for t, task in enumerate(tasks):
        learner.begin_task(task["classes"])
        learner.train()
        opt, sched = make_optimizer(learner, lr, epochs)
        for _ in tqdm(range(epochs), desc=f"ntkcl task {t}", leave=False):
            for xb, yb in batches(task["x_train"], task["y_train"], 32, shuffle=True, generator=g):
                loss, _ = learner.loss(xb, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        learner.end_task(batches(task["x_train"], task["y_train"], 128, shuffle=False), last=t == len(tasks) - 1)
        for j in range(t + 1):
            acc[t, j] = _accuracy(learner.predict, tasks[j])
    return acc, learner


def format_matrix(acc: np.ndarray) -> str:
    rows = ["        " + " ".join(f"  T{j}  " for j in range(acc.shape[1]))]
    for i, row in enumerate(acc):
        rows.append(f"after T{i} " + " ".join("   -   " if np.isnan(v) else f"{100 * v:6.1f} " for v in row))
    return "\n".join(rows)


def save_plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2))
    for ax, (name, acc) in zip(np.atleast_1d(axes), results.items()):
        ax.imshow(np.nan_to_num(acc * 100, nan=0.0), vmin=0, vmax=100, cmap="viridis")
        for i in range(acc.shape[0]):
            for j in range(i + 1):
                ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"{name}  A_T={100 * summary(acc)['A_T']:.1f}")
        ax.set_xlabel("test task")
        ax.set_ylabel("after training task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per task")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.05, help="NTK-CL SGD learning rate")
    ap.add_argument("--lam-l2", type=float, default=1.0)
    ap.add_argument("--lam-ewc", type=float, default=100.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="ntkcl_demo_accuracy.png")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tasks = split_digits(args.tasks, seed=args.seed)
    vit = make_vit()
    train_images = torch.cat([t["x_train"] for t in tasks])
    rot_acc = pretrain_rotation(vit, train_images, epochs=args.pretrain_epochs, seed=args.seed)
    print(f"pre-training (rotation prediction, no labels): train accuracy {100 * rot_acc:.1f}%")
    results, learner = {}, None
    for method in args.methods.split(","):
        if method == "ntkcl":
            results[method], learner = run_ntkcl(vit, tasks, epochs=args.epochs, lr=args.lr, seed=args.seed)
        else:
            lam = args.lam_l2 if method == "l2" else args.lam_ewc
            results[method] = run_baseline(method, vit, tasks, epochs=args.epochs, lam=lam, seed=args.seed)
    for method, acc in results.items():
        s = summary(acc)
        print(f"\n{method}: accuracy matrix (%)\n{format_matrix(acc)}")
        print(f"{method}: A_T {100 * s['A_T']:.1f}  average incremental accuracy {100 * s['avg_inc']:.1f}  "
              f"forgetting {100 * s['forgetting']:.1f}")
    print("\nsummary          A_T   avg_inc  forgetting")
    for method, acc in results.items():
        s = summary(acc)
        print(f"{method:12s} {100 * s['A_T']:6.1f}  {100 * s['avg_inc']:6.1f}  {100 * s['forgetting']:8.1f}")
    timing = None
    if learner is not None:
        xb, yb = tasks[-1]["x_train"][:32], tasks[-1]["y_train"][:32]
        fused = regularizer_time(learner, xb, yb, fused=True)
        eager = regularizer_time(learner, xb, yb, fused=False)
        timing = dict(fused=fused, eager=eager)
        ops = ", ".join(losses.FUSED_OPS)
        print(f"\nNTK-CL regularizers per step (forward + backward, batch 32): fused {1e3 * fused:.3f} ms, "
              f"eager {1e3 * eager:.3f} ms (x{eager / fused:.2f}); ntkcl_fast ops used: {ops}")
    if args.out:
        save_plot(results, args.out)
        print(f"accuracy matrices saved to {os.path.abspath(args.out)}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return dict(results=results, timing=timing)


if __name__ == "__main__":
    main()
