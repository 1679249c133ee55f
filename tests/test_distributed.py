"""Multi-process (gloo, CPU) checks at world sizes 1, 2 and 3: every rank runs tests/_dist_worker.py;
a rank that fails fails the test with its output, and a hang fails after TIMEOUT seconds."""
from __future__ import annotations

import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch without gloo")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 90.0  # seconds per launch; a healthy world of 3 takes well under half of it on 2 cores


def launch(scenario: str, world: int, *args: str) -> None:
    # the ranks meet in a file, not on a port: a free port found here can be taken by another
    # process before rank 0 binds it (seen with several test runs on one machine)
    meeting = tempfile.TemporaryDirectory(prefix="ntkcl-dist-")
    rendezvous = os.path.join(meeting.name, "store")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "tests._dist_worker", scenario, str(r), str(world), rendezvous,
                               *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + TIMEOUT
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad or time.monotonic() > deadline:
                failed = bad[0] if bad else None
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate()[0] for p in procs]
        meeting.cleanup()
    if failed is None and all(p.returncode == 0 for p in procs):
        return
    if failed is None:
        failed = next((r for r, p in enumerate(procs) if p.returncode not in (0, -9)), 0)
        reason = "timed out" if time.monotonic() > deadline else "failed"
    else:
        reason = "failed"
    pytest.fail(f"{scenario} at world {world}: rank {failed} {reason}:\n{outputs[failed][-6000:]}")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ops_on_dtensors_equal_single_process(world):
    launch("ops", world)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_model_ema_fsdp2_and_ddp_equal_single_process(world):
    launch("model_ema", world, "")


def test_dcp_checkpoint_saved_at_2_loads_at_3(tmp_path):
    launch("model_ema", 2, str(tmp_path / "ema"))
    launch("dcp_load", 3, str(tmp_path / "ema"))
