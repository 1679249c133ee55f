"""Fails unless every ntkcl_fast:: op has a kernel for each dispatch key given (default CPU and CUDA).

Run from outside the source tree so the installed package is the one imported:
    python scripts/check_kernels.py CPU CUDA
"""
import sys

import torch

import ntkcl_fast._C  # noqa: F401  registers the ops

keys = sys.argv[1:] or ["CPU", "CUDA"]
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ntkcl_fast::"))
missing = [(op, k) for op in ops for k in keys
           if not torch._C._dispatch_has_kernel_for_dispatch_key(op, k)]
print(f"{len(ops)} ntkcl_fast ops: {', '.join(ops)}")
if not ops or missing:
    sys.exit(f"missing kernels: {missing or 'no ops registered'}")
print(f"every op has a kernel for {', '.join(keys)}")
