#!/usr/bin/env bash
# On a GPU machine with no network: build in place, run the whole suite on CUDA, run the
# benchmarks and the launch-count profile, and leave logs and results in OUT_DIR.
#   bash scripts/gpu_run.sh OUT_DIR [STAGE...]
# Stages (default: all, in this order): build info kernels tests profile bench pytest_bench. Naming
# stages runs just those, e.g. to stay within a per-command time limit:
#   bash scripts/gpu_run.sh "$OUT" build tests; bash scripts/gpu_run.sh "$OUT" profile bench
# Needs python with torch (CUDA), triton, ninja, pytest, pytest-benchmark already installed.
set -uo pipefail
out=${1:?usage: scripts/gpu_run.sh OUT_DIR [STAGE...]}
shift
stages=${*:-build info kernels tests profile bench pytest_bench}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # scripts import bench/
status=0
step() {  # step NAME CMD...: run, log to OUT_DIR/NAME.log, remember failures, keep going
  local name=$1; shift
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name exit $rc"
  [ $rc -eq 0 ] || status=1
}
nvidia-smi >"$out/nvidia-smi.log" 2>&1
step build python -m pip install --no-build-isolation --no-deps -e .
step info python -m ntkcl_fast info
step kernels python scripts/check_kernels.py CPU CUDA
step tests python -m pytest tests -q -rs
step profile python scripts/profile_ema_launches.py --out "$out/ema_launches.json"
step bench python -m bench.run --device cuda --out "$out/results"
step pytest_bench python -m pytest bench/ --benchmark-only -q
exit $status
