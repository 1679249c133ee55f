"""Counts the GPU kernels one ema_update_ call launches on a ViT-B/16-shaped list (152 tensors).

Writes {backend: {dtype case: [kernel names]}} as JSON; the claim to check is one launch per
call for the cuda backend, mixed dtypes included.
"""
import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import ntkcl_fast
from bench.bench_ema import VIT_B


def kernels_of(fn) -> list[str]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shapes = VIT_B
    report = {"tensors": len(shapes)}
    for backend in ("cuda", "triton"):
        if not ntkcl_fast.backends()[backend]:
            continue
        for name, src_dtype in (("fp32<-fp32", torch.float32), ("fp32<-bf16", torch.bfloat16)):
            ema = [torch.randn(s, device="cuda") for s in shapes]
            src = [torch.randn(s, device="cuda", dtype=src_dtype) for s in shapes]
            launches = kernels_of(lambda: ntkcl_fast.ema_update_(ema, src, 0.999, backend=backend))
            report[f"{backend} {name}"] = launches
            print(f"{backend:6} {name}: {len(launches)} kernel launch(es): {sorted(set(launches))}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
