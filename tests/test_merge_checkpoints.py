"""merge_checkpoints and the merge CLI on tiny Llama-shaped checkpoints (API.md, "Model merging")."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from ntkcl_fast import tensor_key
from ntkcl_fast.merge import merge_checkpoints, merge_tensors

from ._helpers import assert_within_budget
from ._tiny_checkpoints import llama_tensors, write_checkpoint

LAYERS = 3
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base + two fine-tunes, bf16 and fp32, the first fine-tune also as a reversed 3-shard copy."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).removeprefix("torch.")
        base = llama_tensors(0, dtype=dtype)
        tuned = [llama_tensors(s, base=base, dtype=dtype) for s in (1, 2)]
        out[tag] = {"base": write_checkpoint(root / tag / "base", base, tokenizer="base-tok"),
                    "m1": write_checkpoint(root / tag / "m1", tuned[0], tokenizer="m1-tok"),
                    "m2": write_checkpoint(root / tag / "m2", tuned[1], tokenizer="m2-tok"),
                    "m1_sharded": write_checkpoint(root / tag / "m1s", tuned[0], shards=3, reverse=True),
                    "tensors": (base, *tuned)}
    return out


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def config(c, method, *, m1="m1", w=(0.6, 0.4), d=(0.5, 0.7), **extra):
    models = [{"model": str(c[m1]), "parameters": {"weight": w[0]}},
              {"model": str(c["m2"]), "parameters": {"weight": w[1]}}]
    if method in ("ties", "dare_linear", "dare_ties"):
        for m, density in zip(models, d):
            m["parameters"]["density"] = density
    cfg = {"merge_method": method, "models": models, **extra}
    if method != "linear":
        cfg["base_model"] = str(c["base"])
    return cfg


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---- against mergekit's algorithm (mergekit/merge_methods/*.py, re-implemented from its code) ----

def mergekit_merge(method, base, models, weights, densities, normalize, lam=1.0):
    """mergekit's linear / generalized_task_arithmetic (task_arithmetic, ties), stacked, in the inputs' dtype."""
    w = torch.tensor(weights, dtype=base.dtype).reshape((-1,) + (1,) * base.dim())
    if method == "linear":
        stacked = torch.stack(models)
        res = (w * stacked).sum(0)
        return res / w.sum(0) if normalize else res
    deltas = []
    for m, density in zip(models, densities):
        delta = m - base
        if method == "ties" and density < 1:
            k = int(density * delta.numel())
            mask = torch.zeros_like(delta)
            mask.view(-1)[torch.argsort(delta.abs().view(-1).float(), descending=True)[:k]] = 1
            delta = delta * mask
        deltas.append(delta)
    wd = torch.stack(deltas) * w
    if method == "ties":
        mask = wd.sign() == ((wd.sum(0) >= 0).to(wd.dtype) * 2 - 1)
        mixed, divisor = (wd * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = wd.sum(0), w.sum(0).expand_as(base).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_matches_mergekit_algorithm_fp32(ckpts, tmp_path, method):
    c = ckpts["float32"]
    normalize = method != "task_arithmetic"
    cfg = config(c, method, parameters={"normalize": normalize} | ({"lambda": 0.8} if method != "linear" else {}))
    out = load_dir(merge_checkpoints(cfg, tmp_path / "out", progress=False))
    base, m1, m2 = c["tensors"]
    lam = 1.0 if method == "linear" else 0.8
    assert set(out) == set(base)
    for name, got in out.items():
        if not base[name].is_floating_point():
            assert torch.equal(got, base[name])
            continue
        def run(dtype):
            return mergekit_merge(method, base[name].to(dtype), [m1[name].to(dtype), m2[name].to(dtype)],
                                  [0.6, 0.4], [0.5, 0.7], normalize, lam)
        assert got.dtype == torch.float32
        assert_within_budget(got, run(torch.float64), run(torch.float32), what=f"{method} {name}")


# ---- wiring: every method equals merge_tensors on the same tensors with the config's parameters ----

def interp(values, t):
    return float(np.interp(t * (len(values) - 1), np.arange(len(values)), values))


def expected_params(name):
    """The parameters of GRADIENT_PARAMS, evaluated here independently of the engine."""
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
    t = 0.0 if layer is None else layer / (LAYERS - 1)
    w1 = interp([0.2, 1.0, 0.4], t)
    w2 = 0.1 if "mlp" in name else 0.7
    d1 = 0.3 if "self_attn" in name else interp([0.9, 0.5], t)
    return [w1, w2], [d1, 0.6]


def gradient_config(c, method):
    params = {"weight": [0.2, 1.0, 0.4]}
    if method in ("ties", "dare_linear", "dare_ties"):
        params["density"] = [{"filter": "self_attn", "value": 0.3}, {"value": [0.9, 0.5]}]
    m2 = {"weight": [{"filter": "mlp", "value": 0.1}, {"filter": "*", "value": 0.7}]}
    cfg = {"merge_method": method, "models": [{"model": str(c["m1"]), "parameters": params},
                                              {"model": str(c["m2"]), "parameters": m2}]}
    if method != "linear":
        cfg["base_model"] = str(c["base"])
        cfg["parameters"] = {"density": 0.6} if "density" in params else {}
    return cfg


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_method_with_filters_and_layer_gradients(ckpts, tmp_path, method, dtype):
    c = ckpts[dtype]
    cfg = gradient_config(c, method)
    out = load_dir(merge_checkpoints(cfg, tmp_path / "out", seed=11, progress=False))
    base, m1, m2 = c["tensors"]
    for name, got in out.items():
        if not base[name].is_floating_point():
            assert torch.equal(got, base[name])
            continue
        weights, densities = expected_params(name)
        kwargs = {"weight": weights}
        if method in ("ties", "dare_linear", "dare_ties"):
            kwargs["density"] = densities
        if method.startswith("dare"):
            kwargs["rescale"] = "l1"  # mergekit's default_rescale=True for dare_*
        want = merge_tensors(None if method == "linear" else base[name], [m1[name], m2[name]], method=method,
                             seed=11, key=tensor_key(name), **kwargs)  # the engine's backend
        assert got.dtype == base[name].dtype
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), name


def test_rescale_values_and_dtype_casts(ckpts, tmp_path):
    c = ckpts["bfloat16"]
    base, m1, m2 = c["tensors"]
    for rescale, want_rescale in ((True, "l1"), (False, "none"), ("density", "density")):
        cfg = config(c, "dare_ties", parameters={"rescale": rescale}, dtype="float32", out_dtype="float16")
        out_dir = merge_checkpoints(cfg, tmp_path / str(rescale), seed=5, progress=False)
        out = load_dir(out_dir)
        name = "model.layers.1.mlp.up_proj.weight"
        want = merge_tensors(base[name].float(), [m1[name].float(), m2[name].float()], method="dare_ties",
                             weight=[0.6, 0.4], density=[0.5, 0.7], rescale=want_rescale, seed=5,
                             key=tensor_key(name)).half()
        assert torch.equal(out[name], want), rescale
        assert json.loads((out_dir / "config.json").read_text())["torch_dtype"] == "float16"


# ---- output bytes: input layout, threads, sharding ----

def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_bytes_independent_of_input_layout_and_threads(ckpts, tmp_path):
    c = ckpts["bfloat16"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = merge_checkpoints(config(c, "dare_ties"), tmp_path / "a", seed=3, shard_size=3000, progress=False)
        torch.set_num_threads(2)
        b = merge_checkpoints(config(c, "dare_ties", m1="m1_sharded"), tmp_path / "b", seed=3, shard_size=3000,
                              progress=False)
    finally:
        torch.set_num_threads(threads)
    fa, fb = file_bytes(a), file_bytes(b)
    fa.pop("merge_config.yml"), fb.pop("merge_config.yml")  # names the other input directory
    assert len(fa) > 4 and fa == fb


def test_shards_index_and_side_files(ckpts, tmp_path):
    c = ckpts["bfloat16"]
    cfg = config(c, "ties")
    out = merge_checkpoints(cfg, tmp_path / "out", shard_size="3kB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    base = c["tensors"][0]
    assert set(index["weight_map"]) == set(base) and set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            nbytes = sum(base[k].element_size() * base[k].numel() for k in f.keys())
            assert all(index["weight_map"][k] == shard for k in f.keys())
        assert len(sizes) == 1 or nbytes <= 3000
        total += nbytes
    assert index["metadata"]["total_size"] == total
    assert (out / "config.json").read_bytes() == (c["base"] / "config.json").read_bytes()
    assert json.loads((out / "tokenizer.json").read_text()) == {"model": "base-tok"}
    assert yaml.safe_load((out / "merge_config.yml").read_text()) == cfg
    single = merge_checkpoints(cfg, tmp_path / "single", progress=False)
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()
    one, many = load_dir(single), load_dir(out)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_yaml_path_tokenizer_source_and_overwrite(ckpts, tmp_path):
    c = ckpts["float32"]
    text = yaml.safe_dump(config(c, "task_arithmetic", tokenizer_source=str(c["m2"])))
    (tmp_path / "merge.yml").write_text("# a comment kept verbatim\n" + text)
    out = tmp_path / "out"
    merge_checkpoints(tmp_path / "merge.yml", out, progress=False)
    assert json.loads((out / "tokenizer.json").read_text()) == {"model": "m2-tok"}
    assert (out / "merge_config.yml").read_text().startswith("# a comment kept verbatim\n")
    with pytest.raises(ValueError, match="not empty"):
        merge_checkpoints(tmp_path / "merge.yml", out, progress=False)
    (out / "stale.txt").write_text("old")
    merge_checkpoints(tmp_path / "merge.yml", out, progress=False, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert entries(tmp_path) == ["merge.yml", "out"]


# ---- bad input: ValueError naming what is wrong, and nothing created ----

def corrupt(c, tmp_path, kind):
    """A copy of m1 with one defect."""
    tensors = dict(c["tensors"][1])
    if kind == "missing tensor":
        del tensors["model.layers.1.mlp.down_proj.weight"]
    if kind == "shape":
        tensors["model.norm.weight"] = torch.zeros(5, dtype=tensors["model.norm.weight"].dtype)
    d = write_checkpoint(tmp_path / "bad" / kind.replace(" ", "_"), tensors, shards=2 if kind == "index" else 1)
    if kind == "header":
        (d / "model.safetensors").write_bytes(b"\xff" * 40)
    if kind == "index":
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.norm.weight"] = "gone.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


BAD = {
    "unsupported key": (lambda cfg: cfg | {"slices": []}, "slices"),
    "unsupported method": (lambda cfg: cfg | {"merge_method": "slerp"}, "merge_method"),
    "missing model": (lambda cfg: cfg | {"models": [{"model": "/nonexistent/m", "parameters": {"weight": 1}}]},
                      "/nonexistent/m"),
    "missing weight": (lambda cfg: cfg | {"models": [{"model": cfg["models"][0]["model"]}]}, "weight is required"),
    "weight for some tensors only": (lambda cfg: cfg | {"models": [{"model": cfg["models"][0]["model"], "parameters": {
        "weight": [{"filter": "mlp", "value": 1.0}]}}]}, "weight is required for tensor"),
    "density out of range": (lambda cfg: cfg | {"models": [{"model": cfg["models"][0]["model"], "parameters": {
        "weight": 1.0, "density": [0.5, 1.5]}}]}, "density"),
    "unknown parameter": (lambda cfg: cfg | {"parameters": {"epsilon": 0.1}}, "epsilon"),
    "rescale on ties": (lambda cfg: cfg | {"merge_method": "ties", "parameters": {"rescale": True}}, "rescale"),
    "bad dtype": (lambda cfg: cfg | {"dtype": "int8"}, "dtype"),
    "union tokenizer": (lambda cfg: cfg | {"tokenizer_source": "union"}, "union"),
    "no base": (lambda cfg: {k: v for k, v in cfg.items() if k != "base_model"}, "base_model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_creates_nothing(ckpts, tmp_path, case):
    make, match = BAD[case]
    cfg = make(config(ckpts["bfloat16"], "dare_ties"))
    with pytest.raises(ValueError, match=match):
        merge_checkpoints(cfg, tmp_path / "out", progress=False)
    assert entries(tmp_path) == []


@pytest.mark.parametrize("kind", ["missing tensor", "shape", "header", "index"])
def test_bad_checkpoint_creates_nothing(ckpts, tmp_path, kind):
    bad = corrupt(ckpts["bfloat16"], tmp_path, kind)
    cfg = config(ckpts["bfloat16"], "ties")
    cfg["models"][1]["model"] = str(bad)
    words = {"missing tensor": "model.layers.1.mlp.down_proj.weight", "shape": "model.norm.weight",
             "header": "not a readable safetensors", "index": "gone.safetensors"}[kind]
    with pytest.raises(ValueError, match=str(bad)) as info:
        merge_checkpoints(cfg, tmp_path / "out", progress=False)
    assert words in str(info.value)
    assert entries(tmp_path) == ["bad"]


@pytest.mark.parametrize("bad", [{"shard_size": "5 parsecs"}, {"shard_size": 0}, {"seed": "x"}, {"device": "nodev"}])
def test_bad_arguments_create_nothing(ckpts, tmp_path, bad):
    with pytest.raises((ValueError, TypeError)):
        merge_checkpoints(config(ckpts["bfloat16"], "linear"), tmp_path / "out", progress=False, **bad)
    assert entries(tmp_path) == []


# ---- CLI ----

def cli(*args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ntkcl_fast", "merge", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_cli_merges_and_reports_one_line_errors(ckpts, tmp_path):
    c = ckpts["bfloat16"]
    (tmp_path / "good.yml").write_text(yaml.safe_dump(config(c, "dare_linear")))
    done = cli(tmp_path / "good.yml", tmp_path / "out", "--seed", "4", "--shard-size", "4000", "--no-progress")
    assert done.returncode == 0, done.stderr
    ref = merge_checkpoints(config(c, "dare_linear"), tmp_path / "ref", seed=4, shard_size=4000, progress=False)
    assert load_dir(tmp_path / "out").keys() == load_dir(ref).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_dir(tmp_path / "out").values(), load_dir(ref).values()))
    bad_cfg = config(c, "ties")
    bad_cfg["models"][0]["model"] = str(corrupt(c, tmp_path, "shape"))
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad_cfg))
    failed = cli(tmp_path / "bad.yml", tmp_path / "out2", "--no-progress")
    assert failed.returncode != 0
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.norm.weight" in lines[0] and "bad" in lines[0], failed.stderr
    assert not (tmp_path / "out2").exists()
    again = cli(tmp_path / "good.yml", tmp_path / "out", "--no-progress")  # non-empty OUT_DIR
    assert again.returncode != 0 and "not empty" in again.stderr


# Ctrl-C's handler as in a foreground process: a test run as a background job (`cmd &` in a
# script) inherits SIGINT ignored, and Python then keeps it ignored
SLOW_MERGE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import ntkcl_fast.merge.engine as engine
real = engine.merge_tensors
def slow(*args, **kwargs):
    time.sleep(0.2)
    return real(*args, **kwargs)
engine.merge_tensors = slow
from ntkcl_fast.merge.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_merge_leaves_no_out_dir(ckpts, tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(config(ckpts["bfloat16"], "ties")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(tmp_path / "cfg.yml"), str(work / "out"),
                             "--no-progress", "--shard-size", "2000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    # wait until shards are being written into the partial directory, then stop the process
    while not any(p.name.startswith(".out.partial-") and any(p.iterdir()) for p in work.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (work / "out").exists()
    if sig != signal.SIGKILL:  # an interrupted merge also removes its partial directory
        assert list(work.iterdir()) == []


PEAK_GROWTH = """
import json, resource, sys
from ntkcl_fast.merge import merge_checkpoints
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge_checkpoints(json.loads(sys.argv[1]), sys.argv[2], progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_peak_memory_is_a_few_tensors_not_the_inputs(tmp_path):
    """API.md: peak memory bounded by a few tensors whatever the model size. Three models of 48
    MB (48 tensors of 1 MB); a reader that kept the input files mapped would hold all 144 MB of
    touched pages at the end, while the pipeline holds a few jobs of 3 inputs + 1 output each."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    models = []
    for m in range(3):
        d = tmp_path / f"m{m}"
        d.mkdir()
        save_file({f"w.{i}": torch.randn(512, 512, generator=g) for i in range(48)}, str(d / "model.safetensors"))
        models.append({"model": str(d), "parameters": {"weight": 1.0}})
    cfg = {"merge_method": "linear", "models": models}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", PEAK_GROWTH, json.dumps(cfg), str(tmp_path / "out")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    growth = int(run.stdout.split()[-1])
    assert growth < 72e6, f"peak RSS grew by {growth / 1e6:.0f} MB while merging 144 MB of inputs"
