"""`ntkcl-merge` under torchrun (2 ranks, gloo on CPU): the ranks split the shards, and the output
files are byte-identical to a single-process merge; a rank that fails fails them all and leaves
nothing behind. A launch that hangs fails after TIMEOUT seconds."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ntkcl_fast.merge import merge_checkpoints

from ._tiny_checkpoints import llama_tensors, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch without gloo")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds per launch; two ranks start (import torch) in well under half of it on 2 cores
SHARD = "20KB"  # the tiny models' ~73 KB of fp32 output in 5 shards: rank 0 writes 3, rank 1 writes 2


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base = llama_tensors(0)
    write_checkpoint(root / "base", base)
    write_checkpoint(root / "m1", llama_tensors(1, base=base), shards=2, reverse=True)
    write_checkpoint(root / "m2", llama_tensors(2, base=base))
    cfg = {"merge_method": "dare_ties", "base_model": str(root / "base"), "dtype": "float32",
           "models": [{"model": str(root / m), "parameters": {"weight": w, "density": 0.6}}
                      for m, w in (("m1", 0.7), ("m2", 0.4))]}
    path = root / "dare.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("shard_size", [SHARD, "5GB"])  # 5GB: one shard, rank 1 writes nothing
def test_two_ranks_write_the_single_process_files(cfg_path, tmp_path, shard_size):
    single = merge_checkpoints(cfg_path, tmp_path / "single", seed=3, shard_size=shard_size, progress=False)
    run = torchrun("-m", "ntkcl_fast", "merge", str(cfg_path), str(tmp_path / "ranks"), "--seed", "3",
                   "--shard-size", shard_size, "--no-progress")
    assert run.returncode == 0, run.stderr[-4000:]
    want, got = file_bytes(single), file_bytes(tmp_path / "ranks")
    shards = [n for n in want if n.endswith(".safetensors")]
    assert len(shards) == (5 if shard_size == SHARD else 1), shards
    assert list(got) == list(want)
    for name in want:
        assert got[name] == want[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks", "single"]  # no build folder left


INJECT = """
import os, sys
from ntkcl_fast.merge import cli, engine
if os.environ["RANK"] == "1":  # rank 1 fails in the middle of its shards
    def broken(*args, **kwargs):
        raise OSError("disk full (injected)")
    engine._run = broken
cli.main(sys.argv[1:])
"""


def test_a_failing_rank_fails_every_rank_and_leaves_nothing(cfg_path, tmp_path):
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    out = tmp_path / "work" / "merged"
    out.parent.mkdir()
    run = torchrun(str(script), str(cfg_path), str(out), "--shard-size", SHARD, "--no-progress")
    assert run.returncode != 0
    assert "OSError: disk full (injected)" in run.stderr, run.stderr[-4000:]
    assert list(out.parent.iterdir()) == []
