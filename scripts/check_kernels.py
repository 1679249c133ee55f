"""Fails unless every ntkcl_fast:: op has a kernel for each dispatch key given (default CPU and CUDA).

Run from outside the source tree so the installed package is the one imported:
    python scripts/check_kernels.py CPU CUDA
"""
import sys

import torch

import ntkcl_fast._C  # noqa: F401  registers the ops

# Ops that have no kernel for a key yet, each with what runs instead (docs/API.md says the same).
# Kept short and explicit: every other op must have every kernel.
NOT_YET = {("ntkcl_fast::merge_tensors", "CUDA"): "CUDA tensors run the Triton kernel (ntkcl_fast/triton/merge.py)",
           ("ntkcl_fast::merge_tensors_into_", "CUDA"): "merge_tensors(out=) on CUDA copies the Triton result in"}

keys = sys.argv[1:] or ["CPU", "CUDA"]
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ntkcl_fast::"))
missing = [(op, k) for op in ops for k in keys
           if not torch._C._dispatch_has_kernel_for_dispatch_key(op, k) and (op, k) not in NOT_YET]
print(f"{len(ops)} ntkcl_fast ops: {', '.join(ops)}")
for (op, k), instead in NOT_YET.items():
    if k in keys:
        print(f"no {k} kernel yet for {op}: {instead}")
if not ops or missing:
    sys.exit(f"missing kernels: {missing or 'no ops registered'}")
print(f"every op has a kernel for {', '.join(keys)}")
