"""The benchmark table: `python -m bench.run [--device auto|cpu|cuda] [--quick] [--out DIR] [--ops ema ...]`.

Each op family contributes rows through `rows(device, quick)` in `bench/bench_<family>.py`;
this file adds what needs the whole run: the copy bandwidth of the device (measured here,
so "% of copy" compares numbers taken on the same machine at the same time), the speedups
of every ntkcl_fast row against each baseline of the same case, and the output files.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import ntkcl_fast  # noqa: E402
from bench import time_ms  # noqa: E402

# a new op family adds its name here and a bench/bench_<name>.py with rows(device, quick)
FAMILIES = ["ema", "penalty", "dare", "ortho", "ntkcl"]
ROOT = Path(__file__).resolve().parent.parent


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() and ntkcl_fast.backends()["cuda"] else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return choice


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str) -> str:
    return "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def copy_bandwidth(device: str) -> tuple[float, int]:
    """GB/s of `dst.copy_(src)` counting read + write, and the buffer size in bytes.

    The buffer is far larger than any cache (1 GiB on GPU, ~350 MB on CPU, about one ViT-B
    fp32 list), so this is the DRAM/HBM rate that a streaming kernel can hope to reach.
    """
    numel = (1 << 28) if device == "cuda" else 88_000_000
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)["ms"]
    nbytes = src.numel() * src.element_size()
    return 2 * nbytes / ms / 1e6, nbytes


def add_derived(rows: list[dict], copy_gbps: float | None) -> list[str]:
    """Fill GB/s, % of copy and speedups; return the baseline names (the speedup columns).

    Rows that are not bandwidth bound (matrix products, a whole training step) have
    `bytes` None: their GB/s and % copy stay None and print blank.
    """
    baselines = list(dict.fromkeys(r["baseline"] for r in rows if r["baseline"]))
    for r in rows:
        r["gbps"] = None if r.get("bytes") is None else r["bytes"] / r["ms"] / 1e6
        r["pct_copy"] = None if r["gbps"] is None or not copy_gbps else 100 * r["gbps"] / copy_gbps
        r["speedup"] = {}
        if r["baseline"] is None:
            for b in rows:
                if b["baseline"] and (b["op"], b["list"], b["dtype"]) == (r["op"], r["list"], r["dtype"]):
                    r["speedup"][b["baseline"]] = b["ms"] / r["ms"]
    return baselines


# optional row keys with a column of their own, blank where a row lacks them:
# peak_mb (extra memory one call allocates, measured on CUDA), pct_step (share of a training step)
OPTIONAL = [("peak_mb", "peak MB", "{:.1f}"), ("pct_step", "% step", "{:.2f}%")]


def _size(r: dict) -> str:
    if r.get("elements") is None:
        return ""
    return (f"{r['tensors']} t, " if r.get("tensors") is not None else "") + f"{r['elements'] / 1e6:.1f}M"


def _cell(v, fmt: str) -> str:
    return "" if v is None else fmt.format(v)


def table_lines(rows: list[dict], baselines: list[str]) -> list[str]:
    optional = [(k, name, fmt) for k, name, fmt in OPTIONAL if any(r.get(k) is not None for r in rows)]
    head = ["op", "list", "size", "dtype", "impl", "median ms", "min ms", "GB/s", "% copy"]
    head += [name for _, name, _ in optional] + [f"vs {b}" for b in baselines]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < 5 else "---:" for i in range(len(head))) + "|",
    ]
    for r in rows:
        cells = [r["op"], r["list"], _size(r), r["dtype"] or "", r["impl"], f"{r['ms']:.2f}", f"{r['ms_min']:.2f}",
                 _cell(r["gbps"], "{:.1f}"), _cell(r["pct_copy"], "{:.0f}%")]
        cells += [_cell(r.get(k), fmt) for k, _, fmt in optional]
        cells += [f"{r['speedup'][b]:.2f}x" if b in r["speedup"] else "" for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict], baselines: list[str], meta: dict) -> str:
    others = "n/a" if meta["others_cpu_pct"] is None else f"{meta['others_cpu_pct']:.0f}%"
    lines = [
        f"Device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['cpu_count']} CPUs, {meta['date']}.",
        f"Copy bandwidth (read + write of a {meta['copy_bytes'] / 1e6:.0f} MB fp32 buffer, higher of the "
        f"measurements before and after the rows): {meta['copy_gbps']:.1f} GB/s. "
        f"Other processes used {others} of the CPUs during the run.",
        "",
    ]
    return "\n".join(lines + table_lines(rows, baselines)) + "\n"


def plot(rows: list[dict], baselines: list[str], meta: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, skipping {path.name} (`pip install matplotlib`)")
        return False
    ours = [r for r in rows if r["baseline"] is None and r["speedup"]]
    colors = {b: f"C{j % 10}" for j, b in enumerate(baselines)}
    # each row gets one bar per baseline it has (families have different baselines), one
    # colour per baseline name across the whole plot
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.16 * sum(len(r["speedup"]) + 1 for r in ours)))
    y, ticks, labels, seen = 0.0, [], [], set()
    for r in ours:
        names = [b for b in baselines if b in r["speedup"]]
        ys = [y + k for k in range(len(names))]
        for yy, b in zip(ys, names):
            v = r["speedup"][b]
            bar = ax.barh([yy], [v], height=0.8, color=colors[b], label=None if b in seen else f"vs {b}")
            ax.bar_label(bar, labels=[f"{v:.2f}x"], fontsize=5, padding=2)
            seen.add(b)
        ticks.append(sum(ys) / len(ys))
        labels.append(f"{r['op']} {r['list']} {r['dtype'] or ''}\n{r['impl']}")
        y += len(names) + 1
    ax.set_xscale("log")  # speedups below 1 (slower) and far above 1 both stay readable
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(ticks, labels, fontsize=5)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (baseline time / ntkcl_fast time)")
    ax.set_title(f"ntkcl_fast on {meta['device_name']} (copy {meta['copy_gbps']:.0f} GB/s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return (out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or None


class OtherLoad:
    """Share of the machine's CPU time used by other processes since `start()` (Linux only).

    On a shared CPU a preempted worker stalls every parallel region it belongs to, so a run
    taken while others were busy is slow and noisy; this number says how much that happened.
    """

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def start(self) -> "OtherLoad":
        self.begin = self._snapshot()
        return self

    def percent(self) -> float | None:
        end = self._snapshot()
        if self.begin is None or end is None or end[0] <= self.begin[0]:
            return None
        others = (end[1] - self.begin[1]) - (end[2] - self.begin[2])
        return max(0.0, 100 * others / ((end[0] - self.begin[0]) * (os.cpu_count() or 1)))


def metadata(device: str, copy_gbps: float, copy_bytes: int, quick: bool, others: float | None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device, "device_name": device_name(device), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": triton_version, "ntkcl_fast": ntkcl_fast.__version__,
        "backends": ntkcl_fast.backends(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps, "copy_bytes": copy_bytes, "quick": quick,
        "others_cpu_pct": others,
        "timer": "triton.testing.do_bench median" if device == "cuda" else "time.perf_counter median",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--ops", nargs="+", choices=FAMILIES, default=FAMILIES)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    before = OtherLoad().start()
    time.sleep(1.0)
    busy = before.percent()
    if device == "cpu" and busy is not None and busy > 10:
        print(f"warning: other processes use {busy:.0f}% of the CPUs; CPU timings will be slow and noisy")
    load = OtherLoad().start()
    print(f"device {device} ({device_name(device)}), measuring copy bandwidth...", flush=True)
    first, copy_bytes = copy_bandwidth(device)
    print(f"copy bandwidth {first:.1f} GB/s", flush=True)
    rows = []
    for family in args.ops:
        rows += importlib.import_module(f"bench.bench_{family}").rows(device, args.quick)
    # measured again at the end: a shared machine's bandwidth drifts during a run, and the
    # higher of the two keeps "% copy" from flattering the kernels
    last, _ = copy_bandwidth(device)
    copy_gbps = max(first, last)
    print(f"copy bandwidth {last:.1f} GB/s (using {copy_gbps:.1f})", flush=True)
    baselines = add_derived(rows, copy_gbps)
    meta = metadata(device, copy_gbps, copy_bytes, args.quick, load.percent())
    meta["copy_gbps_first_last"] = [first, last]
    table = markdown(rows, baselines, meta)
    print()
    print(table)

    # quick runs get their own files so a smoke run never overwrites the real results
    stem = device_slug(device) + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    wrote = [f"{stem}.json", f"{stem}.md"]
    if plot(rows, baselines, meta, args.out / f"{stem}.png"):
        wrote.append(f"{stem}.png")
    print(f"wrote {', '.join(str(args.out / w) for w in wrote)}")


def standalone(family: str, argv: list[str] | None = None) -> None:
    """`python bench/bench_<family>.py [--device cpu|cuda] [--quick] [--json FILE]`: one family's
    rows as the same table, printed (and optionally saved); never touches bench/results/."""
    parser = argparse.ArgumentParser(prog=f"bench/bench_{family}.py")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    copy_gbps, _ = copy_bandwidth(device)
    rows = importlib.import_module(f"bench.bench_{family}").rows(device, args.quick)
    baselines = add_derived(rows, copy_gbps)
    print(f"\n{device_name(device)} ({device}), copy bandwidth {copy_gbps:.1f} GB/s\n")
    print("\n".join(table_lines(rows, baselines)))
    if args.json:
        args.json.write_text(json.dumps({"copy_gbps": copy_gbps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
