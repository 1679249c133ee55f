"""`ntkcl-merge` against `mergekit-yaml` on synthetic Llama-shaped bf16 checkpoints, side by side.

    python -m bench.bench_merge [--hidden 1024] [--layers 8] [--models 2,4] [--methods linear,ties,dare_ties]
                                [--reps 2] [--out bench/results/cpu-merge]

Both tools get the same YAML and run as their own CLI in a fresh process, so wall time includes
each one's startup, measured separately as the fastest of six `--help` runs (three before the
merges, three after); the "after startup" columns subtract it, so they overstate the merge time
a little. Peak RSS is the largest sum of RSS over the process and its children, sampled every
25 ms; anonymous RSS leaves out file-backed pages (the memory maps of inputs and libraries).
Files are written once, so every run reads them from the page cache; the read bandwidth is the
best of two plain sequential passes over the same input files in the same run. mergekit is the
release the Makefile pins (its `mergekit-yaml` beside this interpreter).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"ntkcl": [sys.executable, "-m", "ntkcl_fast", "merge"], "mergekit": [str(Path(sys.executable).parent / "mergekit-yaml")]}
TOOL_ARGS = {"ntkcl": ["--no-progress"], "mergekit": []}


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


def measure(cmd: list[str]) -> dict:
    """Wall seconds, peak RSS and peak anonymous RSS (bytes) of `cmd` with its children."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    top, peak, anon = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            infos = [p.memory_info() for p in [top, *top.children(recursive=True)]]
            peak = max(peak, sum(i.rss for i in infos))
            anon = max(anon, sum(i.rss - i.shared for i in infos))  # without file-backed pages (the memory maps)
        except psutil.Error:  # a process ended between listing and reading
            pass
        time.sleep(0.025)
    wall = time.perf_counter() - t
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{err[-3000:]}")
    return {"s": wall, "rss": peak, "anon": anon}


def measure_startup(times: dict) -> None:
    """`--help` of each tool, three times: import and argument parsing, no merge."""
    for _ in range(3):
        for tool, cmd in TOOLS.items():
            times[tool].append(measure(cmd + ["--help"])["s"])


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
    counts = [int(n) for n in args.models.split(",")]
    if not Path(TOOLS["mergekit"][0]).is_file():
        sys.exit(f"{TOOLS['mergekit'][0]} not found: install mergekit==0.1.5 (the Makefile's TEST_DEPS)")
    rows, startup = [], {tool: [] for tool in TOOLS}
    meta = {"hidden": args.hidden, "layers": args.layers, "vocab": 4 * args.hidden, "dtype": "bfloat16",
            "reps": args.reps, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpus": psutil.cpu_count(), "machine": platform.machine(), "mergekit": _version("mergekit"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg()}

    def save() -> None:
        meta["startup_s"] = {tool: min(times) for tool, times in startup.items()}
        meta["loadavg_end"] = os.getloadavg()
        if args.out:
            table = [{**r, **derived(r, meta["startup_s"])} for r in rows]
            Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1) + "\n")
            Path(args.out + ".md").write_text(markdown(meta, rows))

    measure_startup(startup)
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
                    for tool, cmd in TOOLS.items():  # alternating, so drift hits both
                        out = tmp / f"out-{tool}"
                        r = measure(cmd + [str(cfg_path), str(out)] + TOOL_ARGS[tool])
                        shutil.rmtree(out)
                        if tool not in row or r["s"] < row[tool]["s"]:  # the fastest run, with its RSS
                            row[tool] = r
                rows.append(row)
                save()
                print(line(row, meta["startup_s"]), flush=True)
    measure_startup(startup)  # again at the end: the minimum of both is the least loaded
    save()


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def derived(row: dict, startup: dict) -> dict:
    """Ratios and throughputs of one row; "net" is wall time less the tool's startup."""
    a, b = row["ntkcl"], row["mergekit"]
    net_a, net_b = a["s"] - startup["ntkcl"], b["s"] - startup["mergekit"]
    return {"speedup": b["s"] / a["s"], "rss_ratio": a["rss"] / b["rss"], "net_speedup": net_b / net_a,
            "gbs": row["input_bytes"] / a["s"] / 1e9, "net_gbs": row["input_bytes"] / net_a / 1e9,
            "read_gbs": row["read_bw"] / 1e9}


def line(row: dict, startup: dict) -> str:
    a, b, d = row["ntkcl"], row["mergekit"], derived(row, startup)
    return (f"{row['method']:<10} N={row['models']}  ntkcl {a['s']:6.1f} s {a['rss'] / 1e6:6.0f} MB  "
            f"mergekit {b['s']:6.1f} s {b['rss'] / 1e6:6.0f} MB  speedup {d['speedup']:.2f}x "
            f"(after startup {d['net_speedup']:.2f}x)  RSS {d['rss_ratio']:.2f}x  ntkcl input {d['gbs']:.2f} GB/s, "
            f"after startup {d['net_gbs']:.2f} ({100 * d['net_gbs'] / d['read_gbs']:.0f}% of read)")


def markdown(meta: dict, rows: list[dict]) -> str:
    startup = meta["startup_s"]
    out = [f"# Checkpoint merge, ntkcl-merge vs mergekit-yaml {meta['mergekit']} ({meta['date']})", "",
           f"Llama-shaped bf16 checkpoints, hidden {meta['hidden']}, {meta['layers']} layers, vocab {meta['vocab']}: "
           f"{meta['model_bytes'] / 1e9:.2f} GB per model; torch {meta['torch']}, {meta['torch_threads']} threads, "
           f"{meta['cpus']} CPUs. Each merge is its own CLI process; wall time includes startup (`--help` takes "
           f"{startup['ntkcl']:.1f} s for ntkcl-merge, {startup['mergekit']:.1f} s for mergekit-yaml; \"after "
           f"startup\" subtracts it); peak RSS of the process tree, anonymous part in brackets; inputs in the page "
           f"cache; fastest of {meta['reps']} alternating runs. Load average (1/5/15 min) "
           f"{'/'.join(f'{x:.1f}' for x in meta['loadavg_start'])} at the start, "
           f"{'/'.join(f'{x:.1f}' for x in meta['loadavg_end'])} at the end, on {meta['cpus']} CPUs.", "",
           "| method | N | input GB | ntkcl s | mergekit s | speedup (after startup) | ntkcl RSS MB | mergekit RSS MB "
           "| RSS ratio | read GB/s | ntkcl input GB/s, after startup (% of read) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b, d = r["ntkcl"], r["mergekit"], derived(r, startup)
        out.append(f"| {r['method']} | {r['models']} | {r['input_bytes'] / 1e9:.2f} | {a['s']:.1f} | {b['s']:.1f} | "
                   f"{d['speedup']:.2f}x ({d['net_speedup']:.2f}x) | {a['rss'] / 1e6:.0f} ({a['anon'] / 1e6:.0f}) | "
                   f"{b['rss'] / 1e6:.0f} ({b['anon'] / 1e6:.0f}) | {d['rss_ratio']:.2f} | {d['read_gbs']:.2f} | "
                   f"{d['gbs']:.2f}, {d['net_gbs']:.2f} ({100 * d['net_gbs'] / d['read_gbs']:.0f}%) |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
