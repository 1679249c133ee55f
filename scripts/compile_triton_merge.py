"""Compiles the merge_tensors Triton kernels to PTX for sm_80 and sm_90 without a GPU, and checks
that the PTX keeps the CPU kernel's rounding: no fused multiply-add in floating point (the
launches pass enable_fp_fusion=False), IEEE division (div.rn) and no flush of subnormals (.ftz),
as bit-identical results need.

The interpreter (TRITON_INTERPRET=1, what CI runs) neither type-checks kernels the way the
compiler does nor shows what the GPU rounds, so this is the check of both on machines without a
GPU. Exit 0 when every variant compiles and passes for both targets. Run with TRITON_INTERPRET
unset: `python scripts/compile_triton_merge.py`.
"""
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# the kernels of this checkout, not those of an installed copy of the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ntkcl_fast.triton import merge as tm  # noqa: E402

assert Path(tm.__file__).resolve().parent.parent.parent == Path(__file__).resolve().parent.parent

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
C = "constexpr"
# a float FMA, a division that is not correctly rounded, or subnormals flushed to zero
UNEXACT = re.compile(r"\b(fma|mad)\.[a-z.]*f(32|64)\b|\bdiv\.(approx|full)\.|\.ftz\.")


def compile_one(fn, pointers: dict, consts: dict) -> None:
    sig = dict(pointers, **{k: C for k in consts})
    for target in TARGETS:
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                options=tm.FAST_MATH_OFF)
        ptx = kernel.asm.get("ptx")
        assert ptx, f"{fn.__name__} sm_{target.arch}: no PTX"
        bad = sorted(set(m.group(0) for m in UNEXACT.finditer(ptx)))
        assert not bad, f"{fn.__name__} {consts} sm_{target.arch}: {bad} in the PTX"


def _ptr(dtype) -> str:
    return "*" + {tl.float16: "fp16", tl.bfloat16: "bf16", tl.float32: "fp32", tl.float64: "fp64"}[dtype]


# (LINEAR, SPARSIFY, RESCALE, CONSENSUS, NORMALIZE, SPLIT): every method, each rescale once
VARIANTS = ((True, 0, 0, False, True, False), (False, 0, 0, False, False, False), (False, 1, 0, True, True, False),
            (False, 1, 0, True, True, True), (False, 2, 1, False, False, False), (False, 2, 2, True, True, False),
            (False, 2, 0, True, False, False))


def main() -> int:
    # every variant in fp32 and fp64 math; fp16 / bf16 differ from fp32 only in loads and the store
    # (bf16's hand rounding), so one variant each, the one with the most paths
    for dt in (tl.float32, tl.float64, tl.bfloat16, tl.float16):
        acc = tl.float64 if dt == tl.float64 else tl.float32
        meta = {"E": dt, "ACC": acc, "IS_F64": dt == tl.float64}
        data = {"base": _ptr(dt), "ptrs": "*i64"}
        for linear, sparsify, rescale, consensus, normalize, split in VARIANTS if acc == dt else VARIANTS[5:6]:
            # DARE's draws: offsets at a group of 4 (one Philox call per 4 elements) and not
            for aligned in (True, False) if sparsify == 2 else (True,):
                compile_one(tm._merge_kernel, {"out": _ptr(dt), **data, "fparams": _ptr(acc), "iparams": "*i64",
                                               "ties_before": "*i64", "n": "i64", "n_blocks": "i64", "offset": "i64"},
                            {"N": 3, **meta, "LINEAR": linear, "SPARSIFY": sparsify, "RESCALE": rescale,
                             "CONSENSUS": consensus, "NORMALIZE": normalize, "SPLIT": split, "ALIGNED": aligned,
                             "BLOCK": tm.BLOCK})
        if acc != dt:
            print(f"{dt}: ok", flush=True)
            continue
        for first, shift in ((True, 16), (False, 0)):
            compile_one(tm._histogram_kernel, {**data, "prefix": "*i64", "hist": "*i64", "n": "i64"},
                        {"S": 2, "SHIFT": shift, "FIRST": first, **meta, "BLOCK": tm.BLOCK})
        compile_one(tm._tie_count_kernel, {**data, "thresholds": "*i64", "counts": "*i64", "n": "i64",
                                           "n_blocks": "i64"}, {"S": 2, **meta, "BLOCK": tm.BLOCK})
        for aligned in (True, False):
            compile_one(tm._l1_kernel, {**data, "iparams": "*i64", "full": "*fp64", "kept": "*fp64", "n": "i64",
                                        "n_chunks": "i64", "S": "i32", "offset": "i64"},
                        {"E": dt, "ACC": acc, "CHUNK": tm.L1_CHUNK, "TILE": tm.L1_TILE, "LANES": tm.L1_LANES,
                         "TILES": tm.L1_CHUNK // tm.L1_TILE, "ALIGNED": aligned})
        print(f"{dt}: ok", flush=True)
    print("every merge_tensors Triton kernel compiles for sm_80 and sm_90, without float FMA or inexact division")
    return 0


if __name__ == "__main__":
    sys.exit(main())
