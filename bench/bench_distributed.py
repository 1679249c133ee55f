"""ModelEMA on an FSDP2 (`fully_shard`) model: update time and per-rank memory of the average.

`python -m bench.bench_distributed [--device cpu|cuda] [--world 2]` spawns `--world` ranks (gloo
on CPU, nccl on CUDA, one GPU per rank) on this machine, shards a model with ViT-B/16's parameter
shapes (timm `vit_base_patch16_224`: 152 tensors, 86.6M elements, 76 modules) and times one EMA
update per call, three ways of keeping the average side by side, in one run:
- ntkcl_fast `ModelEMA(fsdp_model)`: the average is this rank's local shards, one fused call;
- torchtitan's `EMAOptimizersContainer` (torchtitan/components/ema.py, written out here, not
  imported): a DTensor clone of each parameter, `torch._foreach_lerp_` on the DTensors (which
  runs on the local shards), and the same on `.to_local()` shards, without DTensor dispatch;
- a full replica per rank (timm `ModelEmaV3`'s `_foreach_lerp_` on an unsharded copy): each
  update first all-gathers the full weights (`full_tensor()`), and the lerp alone beside it,
  as if unsharded weights were at hand (DDP).
Each call is timed on every rank after a barrier; a call's time is the slowest rank's, and a
row reports the minimum over `--reps` calls (the machine is shared and noisy), the rows taking
turns call by call. A `b.add_(a)` probe on shard-sized tensors, on every rank at once, gives the
memory rate the prediction uses. Writes bench/results/<device>-distributed.md and .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DECAY = 0.999
CASES = {"fp32<-fp32": torch.float32, "fp32<-bf16": torch.bfloat16}  # average fp32 <- model dtype
BLOCK = (("norm1", "norm", 1), ("qkv", "linear", 3), ("proj", "linear", 1),
         ("norm2", "norm", 1), ("fc1", "linear", 4), ("fc2", "linear", -4))


def vit(dim: int = 768, depth: int = 12, classes: int = 1000, patch: int = 16, img: int = 224) -> torch.nn.Module:
    """timm ViT's parameters in its named_parameters() order (bench_ema.vit_shapes), flat: the
    root, the patch embedding, 6 modules per block, the final norm and the head (76 for ViT-B).
    No forward: the EMA only reads the parameters."""
    model = torch.nn.Module()
    model.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    model.pos_embed = torch.nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
    model.patch_embed = torch.nn.Conv2d(3, dim, patch, patch)
    for i in range(depth):
        for name, kind, ratio in BLOCK:
            if kind == "norm":
                layer = torch.nn.LayerNorm(dim)
            else:
                fan_in, fan_out = (dim, dim * ratio) if ratio > 0 else (dim * -ratio, dim)
                layer = torch.nn.Linear(fan_in, fan_out)
            model.add_module(f"block{i}_{name}", layer)
    model.norm = torch.nn.LayerNorm(dim)
    model.head = torch.nn.Linear(dim, classes)
    return model


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TorchtitanEMA:
    """torchtitan's EMA, its update as written there: the parameter list walked each call, one
    `_foreach_lerp_` over DTensor clones (an fp32 average of a bf16 model converts the model
    first, since `_foreach_lerp_` takes one dtype). `local=True`: the same on `.to_local()`."""

    def __init__(self, model, dtype, local: bool):
        self.model, self.dtype, self.local = model, dtype, local
        self.state = {p: self._view(p).detach().to(dtype, copy=True) for p in model.parameters()}

    def _view(self, p):
        return p.to_local() if self.local else p

    def update(self, decay: float) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        ema = [self.state[p] for p in params]
        src = [self._view(p).detach() for p in params]
        if src[0].dtype != self.dtype:
            src = [s.to(self.dtype) for s in src]
        torch._foreach_lerp_(ema, src, 1.0 - decay)

    def average(self):
        return [t.to_local() if hasattr(t, "to_local") else t for t in self.state.values()]


class FullReplica:
    """timm ModelEmaV3's update on an unsharded fp32 copy per rank. `gather`: the full weights are
    all-gathered from the shards each call (FSDP2 keeps no unsharded copy between forwards)."""

    def __init__(self, model, dtype, gather: bool):
        self.params, self.gather = list(model.parameters()), gather
        full = [p.full_tensor() for p in self.params]
        self.avg = [f.to(dtype, copy=True) for f in full]
        self.held = None if gather else full  # the lerp-only row reads weights gathered once

    def update(self, decay: float) -> None:
        full = [p.full_tensor() for p in self.params] if self.gather else self.held
        if full[0].dtype != self.avg[0].dtype:
            full = [f.to(self.avg[0].dtype) for f in full]
        torch._foreach_lerp_(self.avg, full, 1.0 - decay)

    def average(self):
        return self.avg


def host_us(calls: int = 300) -> float:
    """Fastest of `calls` `ModelEMA.update` calls on the 76-module ViT-B layout at width 8, one
    process, one thread: the kernels do next to nothing, so this is the host cost of one update.
    Run it under another tree's PYTHONPATH to compare that tree's ModelEMA."""
    from ntkcl_fast import ModelEMA
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = vit(8, 12, classes=10, patch=16, img=32)
    ema = ModelEMA(model, DECAY)
    for _ in range(20):
        ema.update(model)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        ema.update(model)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    """Seconds of one call on the slowest rank, the ranks starting together."""
    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64,
                        device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def _add_probe(numel: int, device):
    """`b.add_(a)` in place on fp32 tensors of `numel` elements: 12 B/element, no write-allocate,
    run on every rank at once, so its rate is what an EMA pass over a shard can reach here."""
    a = torch.randn(numel, device=device)
    b = torch.randn(numel, device=device)
    return lambda: b.add_(a)


def _impls(model, dtype, local_elements: int, full_elements: int):
    """(label, update, average tensors, elements the lerp touches, temporaries in bytes per call)."""
    from ntkcl_fast import ModelEMA
    size = torch.empty((), dtype=dtype).element_size()
    cast = 4 if dtype != torch.float32 else 0  # _foreach_lerp_ wants one dtype: an fp32 copy of the weights
    ours = ModelEMA(model, DECAY, dtype=torch.float32)
    titan, titan_local = TorchtitanEMA(model, torch.float32, False), TorchtitanEMA(model, torch.float32, True)
    gathered, held = FullReplica(model, torch.float32, True), FullReplica(model, torch.float32, False)
    return [
        ("ntkcl_fast ModelEMA (local shards, fused)", lambda: ours.update(model), ours._sharded.average,
         local_elements, 0),
        ("torchtitan: _foreach_lerp_ on DTensors", lambda: titan.update(DECAY), titan.average(),
         local_elements, local_elements * cast),
        ("_foreach_lerp_ on .to_local() shards", lambda: titan_local.update(DECAY), titan_local.average(),
         local_elements, local_elements * cast),
        ("full replica: full_tensor() + _foreach_lerp_", lambda: gathered.update(DECAY), gathered.average(),
         full_elements, full_elements * (size + cast)),
        ("full replica: _foreach_lerp_ only (no gather)", lambda: held.update(DECAY), held.average(),
         full_elements, full_elements * cast),
    ]


def _rank(rank: int, world: int, port: int, device_type: str, dim: int, depth: int, reps: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    mesh = init_device_mesh(device_type, (world,))
    rows = []
    try:
        for case, model_dtype in CASES.items():
            torch.manual_seed(0)
            with torch.device(device):
                model = vit(dim, depth).to(model_dtype)
            full_elements = sum(p.numel() for p in model.parameters())
            fully_shard(model, mesh=mesh)
            local = [p.to_local() for p in model.parameters()]
            local_elements = sum(t.numel() for t in local)
            impls = _impls(model, model_dtype, local_elements, full_elements)
            probe = _add_probe(local_elements, device)
            timed = [(label, fn) for label, fn, *_ in impls] + [("probe", probe)]
            for _, fn in timed:  # warm-up: allocator growth, first-touch page faults
                fn()
            times = {label: [] for label, _ in timed}
            for _ in range(reps):  # the rows take turns, call by call, so they share the machine's moods
                for label, fn in timed:
                    times[label].append(_timed(fn, device))
            rate = 12 * local_elements / min(times["probe"]) / 1e9
            src_size = torch.empty((), dtype=model_dtype).element_size()
            for label, _, average, elements, temporaries in impls:
                moved = elements * (4 + src_size + 4)  # read average, read weights, write average
                rows.append({"case": case, "impl": label, "ms_min": 1e3 * min(times[label]),
                             "ms_median": 1e3 * sorted(times[label])[len(times[label]) // 2],
                             "average_bytes_per_rank": _nbytes(average), "elements_per_rank": elements,
                             "bytes_moved_per_rank": moved, "predicted_ms": 1e3 * moved / (rate * 1e9),
                             "add_rate_gbps": rate, "model_shard_bytes": _nbytes(local),
                             "temporaries_bytes_per_rank": temporaries,
                             "full_elements": full_elements})
            del impls, timed, probe, model, local
            if device_type == "cuda":
                torch.cuda.empty_cache()
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(device: str, world: int, dim: int, depth: int, reps: int, timeout: float) -> list[dict]:
    """Spawns the ranks and returns rank 0's rows; a run past `timeout` seconds is terminated."""
    if device == "cuda" and torch.cuda.device_count() < world:
        raise SystemExit(f"--device cuda needs one GPU per rank: {world} ranks, {torch.cuda.device_count()} GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        ctx = mp.spawn(_rank, args=(world, _free_port(), device, dim, depth, reps, out), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                raise SystemExit(f"the ranks ran past --timeout {timeout:.0f} s and were stopped")
        return json.loads(Path(out).read_text())


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# ModelEMA on FSDP2: {meta['world']} {meta['backend']} ranks, {meta['device_name']}", "",
             f"Model: {meta['model']}; torch {meta['torch']}; {meta['threads_per_rank']} thread(s) per rank; "
             f"min of {meta['reps']} calls (slowest rank per call); {meta['date']}.", "",
             "| case | impl | min ms | median ms | vs ours | average MB / rank | temporaries MB / rank "
             "| MB moved / rank | predicted ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        group = [r for r in rows if r["case"] == case]
        ours = group[0]["ms_min"]
        for r in group:
            lines.append(f"| {case} | {r['impl']} | {r['ms_min']:.2f} | {r['ms_median']:.2f} | "
                         f"{r['ms_min'] / ours:.2f}x | {r['average_bytes_per_rank'] / 1e6:.1f} | "
                         f"{r['temporaries_bytes_per_rank'] / 1e6:.1f} | "
                         f"{r['bytes_moved_per_rank'] / 1e6:.1f} | {r['predicted_ms']:.2f} |")
    rate = ", ".join(f"{case} {r['add_rate_gbps']:.1f} GB/s" for case, r in
                     {r["case"]: r for r in rows}.items())
    lines += ["", f"Predicted: bytes moved / the in-place add rate measured on every rank at once ({rate}); "
              "the gather rows' prediction counts the lerp only. 'vs ours': time / ours (above 1: ours faster). "
              "Average MB: the tensors that hold the average on one rank (measured); temporaries: what one "
              "update allocates and frees (counted from the code: gathered full weights, fp32 copies of "
              "bf16 weights for `_foreach_lerp_`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dim", type=int, default=768, help="ViT width (768: ViT-B/16)")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are stopped")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--host", action="store_true", help="print ModelEMA.update's host cost (us) and exit")
    args = parser.parse_args(argv)
    if args.host:
        import ntkcl_fast
        print(f"ModelEMA.update, 76-module ViT-B layout at width 8, min of 300: {host_us():.1f} us "
              f"({ntkcl_fast.__file__})")
        return
    began = time.perf_counter()
    rows = run(args.device, args.world, args.dim, args.depth, args.reps, args.timeout)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()}-core CPU"
    meta = {"device": args.device, "device_name": name, "world": args.world,
            "backend": "nccl" if args.device == "cuda" else "gloo", "torch": torch.__version__,
            "model": f"ViT dim {args.dim} depth {args.depth} ({rows[0]['full_elements'] / 1e6:.1f}M "
                     "elements, fully_shard on the root)" if rows else "",
            "threads_per_rank": max(1, (os.cpu_count() or 1) // args.world), "reps": args.reps,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    text = markdown(rows, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.device}-distributed"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {stem}.md and .json in {time.perf_counter() - began:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
