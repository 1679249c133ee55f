"""`ntkcl-merge` against `mergekit-yaml` on synthetic Llama-shaped bf16 checkpoints, side by side.

    python -m bench.bench_merge [--hidden 1024] [--layers 8] [--models 2,4] [--methods linear,ties,dare_ties]
                                [--reps 2] [--out bench/results/cpu-merge]

Both tools get the same YAML; each merge runs in a fresh process that imports the tool's CLI
entry point and then calls it, so there are two times: the whole process (startup included) and
the merge alone (after the imports). Peak RSS is the largest sum of RSS over the process and its
children, sampled every 25 ms; anonymous RSS leaves out file-backed pages (the memory maps of
inputs and libraries). Files are written once, so every run reads them from the page cache; the
read bandwidth is the best of two plain sequential passes over the same input files in the same
run. mergekit is the release the Makefile pins.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
# Each tool's CLI entry point, imported before the clock starts, so "merge" is the merge alone
# (what the CLI imports lazily during the merge still counts); the parent times the whole process.
CHILD = """
import sys, time
{imports}
t = time.perf_counter()
try:
    {call}
    code = 0
except SystemExit as e:
    code = e.code
print(f"merge_s={{time.perf_counter() - t}}", file=sys.stderr)
sys.exit(code)
"""
TOOLS = {
    "ntkcl": CHILD.format(imports="from ntkcl_fast.merge import cli, engine",
                          call='cli.main([*sys.argv[1:], "--no-progress"])'),
    "mergekit": CHILD.format(imports="from mergekit.scripts.run_yaml import main",
                             call="main(sys.argv[1:], standalone_mode=False)"),
}


def write_models(root: Path, hidden: int, layers: int, n: int) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from tests._tiny_checkpoints import llama_tensors, write_hf_checkpoint
    shape = dict(layers=layers, hidden=hidden, vocab=4 * hidden)
    base = llama_tensors(0, **shape)
    dirs = [write_hf_checkpoint(root / "base", base, **shape)]
    for i in range(n):
        tuned = llama_tensors(i + 1, base=base, **shape)
        dirs.append(write_hf_checkpoint(root / f"m{i}", tuned, shards=2, **shape))
    return dirs


def read_bandwidth(files: list[Path]) -> float:
    best = 0.0
    for _ in range(2):
        t, total = time.perf_counter(), 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
        best = max(best, total / (time.perf_counter() - t))
    return best


def measure(tool: str, args: list[str]) -> dict:
    """Wall seconds of the process, seconds of the merge in it, peak RSS and peak anonymous RSS
    (bytes) of the process with its children."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", TOOLS[tool], *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    top, peak, anon = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            infos = [p.memory_info() for p in [top, *top.children(recursive=True)]]
            peak = max(peak, sum(i.rss for i in infos))
            anon = max(anon, sum(i.rss - i.shared for i in infos))
        except psutil.Error:  # a process ended between listing and reading
            pass
        time.sleep(0.025)
    wall = time.perf_counter() - t
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{tool} exited {proc.returncode}:\n{err[-3000:]}")
    merge = float(re.findall(r"merge_s=([0-9.e+-]+)", err)[-1])
    return {"s": wall, "merge_s": merge, "rss": peak, "anon": anon}


def config(method: str, base: Path, models: list[Path]) -> dict:
    params = {"weight": round(1 / len(models), 4)}
    if method in ("ties", "dare_ties", "dare_linear"):
        params["density"] = 0.5
    cfg = {"merge_method": method, "models": [{"model": str(m), "parameters": params} for m in models]}
    if method != "linear":
        cfg["base_model"] = str(base)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--models", default="2,4")
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    ap.add_argument("--reps", type=int, default=2, help="runs per tool and row (the fastest is kept)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (after every row)")
    args = ap.parse_args()
    try:
        mergekit_version = version("mergekit")
    except ImportError:
        sys.exit("mergekit is not installed here: pip install mergekit==0.1.5 (the Makefile's TEST_DEPS)")
    counts = [int(n) for n in args.models.split(",")]
    rows = []
    meta = {"hidden": args.hidden, "layers": args.layers, "vocab": 4 * args.hidden, "dtype": "bfloat16",
            "reps": args.reps, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpus": psutil.cpu_count(), "machine": platform.machine(), "mergekit": mergekit_version,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg()}

    def save() -> None:
        meta["loadavg_end"] = os.getloadavg()
        if args.out:
            table = [{**r, **derived(r)} for r in rows]
            Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1) + "\n")
            Path(args.out + ".md").write_text(markdown(meta, rows))

    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-merge-") as tmp:
        tmp = Path(tmp)
        base, *models = write_models(tmp, args.hidden, args.layers, max(counts))
        size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))
        meta["model_bytes"] = size(base)
        for n in counts:
            used = models[:n]
            files = [f for d in (base, *used) for f in d.glob("*.safetensors")]
            bw = read_bandwidth(files)
            print(f"N={n}: {size(base) / 1e9:.2f} GB per model, plain read {bw / 1e9:.2f} GB/s", flush=True)
            for method in args.methods.split(","):
                cfg_path = tmp / f"{method}-{n}.yml"
                cfg_path.write_text(yaml.safe_dump(config(method, base, used)))
                read = sum(map(size, used)) + (size(base) if method != "linear" else 0)
                row = {"method": method, "models": n, "input_bytes": read, "read_bw": bw}
                for _ in range(args.reps):
                    for tool in TOOLS:  # alternating, so drift hits both
                        out = tmp / f"out-{tool}"
                        r = measure(tool, [str(cfg_path), str(out)])
                        shutil.rmtree(out)
                        if tool not in row or r["merge_s"] < row[tool]["merge_s"]:  # the fastest run, with its RSS
                            row[tool] = r
                rows.append(row)
                save()
                print(line(row), flush=True)


def derived(row: dict) -> dict:
    """Ratios and input throughputs of one row (whole process, and the merge alone)."""
    a, b = row["ntkcl"], row["mergekit"]
    return {"speedup": b["s"] / a["s"], "merge_speedup": b["merge_s"] / a["merge_s"], "rss_ratio": a["rss"] / b["rss"],
            "gbs": row["input_bytes"] / a["s"] / 1e9, "merge_gbs": row["input_bytes"] / a["merge_s"] / 1e9,
            "mergekit_merge_gbs": row["input_bytes"] / b["merge_s"] / 1e9, "read_gbs": row["read_bw"] / 1e9}


def line(row: dict) -> str:
    a, b, d = row["ntkcl"], row["mergekit"], derived(row)
    return (f"{row['method']:<10} N={row['models']}  ntkcl {a['s']:5.1f} s (merge {a['merge_s']:5.1f}) "
            f"{a['rss'] / 1e6:5.0f} MB  mergekit {b['s']:5.1f} s (merge {b['merge_s']:5.1f}) {b['rss'] / 1e6:5.0f} MB  "
            f"speedup {d['speedup']:.2f}x (merge {d['merge_speedup']:.2f}x)  RSS {d['rss_ratio']:.2f}x  "
            f"ntkcl merge {d['merge_gbs']:.2f} GB/s ({100 * d['merge_gbs'] / d['read_gbs']:.0f}% of read)")


def markdown(meta: dict, rows: list[dict]) -> str:
    load = lambda key: "/".join(f"{x:.1f}" for x in meta[key])
    out = [f"# Checkpoint merge, ntkcl-merge vs mergekit-yaml {meta['mergekit']} ({meta['date']})", "",
           f"Llama-shaped bf16 checkpoints, hidden {meta['hidden']}, {meta['layers']} layers, vocab {meta['vocab']}: "
           f"{meta['model_bytes'] / 1e9:.2f} GB per model; torch {meta['torch']}, {meta['torch_threads']} threads, "
           f"{meta['cpus']} CPUs, load average (1/5/15 min) {load('loadavg_start')} at the start and "
           f"{load('loadavg_end')} at the end. Each merge is its own process running the tool's CLI entry point: "
           f"\"process\" is its wall time, \"merge\" the time after its imports. Peak RSS of the process tree "
           f"(anonymous part in brackets). Inputs in the page cache; read GB/s: plain sequential reads of the same "
           f"files. Fastest merge of {meta['reps']} alternating runs.", "",
           "| method | N | input GB | ntkcl process / merge s | mergekit process / merge s | speedup process / merge "
           "| ntkcl RSS MB | mergekit RSS MB | RSS ratio | read GB/s | merge input GB/s: ntkcl (% of read) / mergekit |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b, d = r["ntkcl"], r["mergekit"], derived(r)
        out.append(f"| {r['method']} | {r['models']} | {r['input_bytes'] / 1e9:.2f} | {a['s']:.1f} / {a['merge_s']:.1f} | "
                   f"{b['s']:.1f} / {b['merge_s']:.1f} | {d['speedup']:.2f}x / {d['merge_speedup']:.2f}x | "
                   f"{a['rss'] / 1e6:.0f} ({a['anon'] / 1e6:.0f}) | {b['rss'] / 1e6:.0f} ({b['anon'] / 1e6:.0f}) | "
                   f"{d['rss_ratio']:.2f} | {d['read_gbs']:.2f} | {d['merge_gbs']:.2f} "
                   f"({100 * d['merge_gbs'] / d['read_gbs']:.0f}%) / {d['mergekit_merge_gbs']:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
