"""merge_checkpoints on synthetic Llama-shaped bf16 checkpoints: wall time, peak RSS, input GB/s.

    python -m bench.bench_merge [--hidden 1024] [--layers 8] [--models 2] [--methods linear,ties,dare_ties]

Each merge runs in its own process so its peak RSS (ru_maxrss) is its own. The read bandwidth
row is one cold-ish pass of plain reads over the same input files in the same run. mergekit is
not compared here (it is not installed beside this torch).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, resource, sys, time
from ntkcl_fast.merge import merge_checkpoints
t = time.perf_counter()
merge_checkpoints(json.loads(sys.argv[1]), sys.argv[2], progress=False, shard_size="2GB")
print(json.dumps({"s": time.perf_counter() - t, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_models(root: Path, hidden: int, layers: int, n: int) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from tests._tiny_checkpoints import llama_tensors, write_checkpoint
    base = llama_tensors(0, layers=layers, hidden=hidden, vocab=4 * hidden)
    dirs = [write_checkpoint(root / "base", base, layers=layers, hidden=hidden, vocab=4 * hidden)]
    for i in range(n):
        tuned = llama_tensors(i + 1, layers=layers, hidden=hidden, vocab=4 * hidden, base=base)
        dirs.append(write_checkpoint(root / f"m{i}", tuned, shards=2, layers=layers, hidden=hidden, vocab=4 * hidden))
    return dirs


def read_bandwidth(files: list[Path]) -> float:
    t, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        base, *models = write_models(Path(tmp), args.hidden, args.layers, args.models)
        files = [f for d in (base, *models) for f in d.glob("*.safetensors")]
        in_bytes = sum(f.stat().st_size for f in files)
        bw = read_bandwidth(files)
        print(f"inputs {in_bytes / 1e9:.2f} GB in {len(files)} files, plain read {bw / 1e9:.2f} GB/s, "
              f"torch threads {torch.get_num_threads()}")
        for method in args.methods.split(","):
            cfg = {"merge_method": method, "base_model": str(base),
                   "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}
                               if method != "linear" and method != "task_arithmetic" else {"weight": 0.5}}
                              for m in models]}
            if method == "linear":
                del cfg["base_model"]
            run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(Path(tmp) / f"out-{method}")],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            read = in_bytes if method != "linear" else in_bytes - sum(f.stat().st_size for f in base.glob("*"))
            print(f"{method:<10} N={args.models} {r['s']:.2f} s  peak RSS {r['rss'] / 1e6:.0f} MB  "
                  f"input {read / r['s'] / 1e9:.2f} GB/s ({100 * read / r['s'] / bw:.0f}% of plain read)")


if __name__ == "__main__":
    main()
