"""Compiles the L2 / EWC / AdamR Triton kernels to PTX for sm_90 without a GPU.

The interpreter (TRITON_INTERPRET=1, what CI runs) does not type-check kernels the way the
compiler does; this catches compile errors on machines without a GPU. Exit 0 when every
variant compiles. Run with TRITON_INTERPRET unset: `python scripts/compile_triton_penalty.py`.
"""
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# the kernels of this checkout, not those of an installed copy of the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ntkcl_fast.triton import adamr as ta  # noqa: E402
from ntkcl_fast.triton import penalty as tp  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
C = "constexpr"


def compile_one(fn, pointers: dict, consts: dict) -> None:
    sig = dict(pointers, **{k: C for k in consts})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET)
    assert kernel.asm.get("ptx"), f"{fn.__name__}: no PTX"


def main() -> int:
    l2_args = {"table": "*i64", "count": "i32", "partials": "*fp64", "first_partial": "i32", "coef_ptr": "*fp64"}
    for has_f, has_g, p_dt, acc in ((True, True, tl.bfloat16, tl.float32), (False, False, tl.float32, tl.float32),
                                    (True, True, tl.bfloat16, tl.float64)):
        compile_one(tp._l2_kernel, l2_args, {
            "HAS_F": has_f, "HAS_G": has_g, "ACCUMULATE": True, "P": p_dt, "A": tl.float32, "F": tl.float32,
            "G": p_dt, "ACC": acc, "G_VIA_FP32": p_dt == tl.bfloat16 and acc == tl.float64, "CHUNK": 4096,
            "STEPS": 5})
    compile_one(tp._fisher_kernel, {"table": "*i64", "count": "i32", "scalars": "*fp64"},
                {"FI": tl.float32, "GR": tl.bfloat16, "ACC": tl.float32, "VIA_FP32": False, "CHUNK": 4096,
                 "STEPS": 5})
    for l1, amsgrad, has_v in ((True, False, False), (False, True, True)):
        compile_one(ta._adamr_step_kernel, {"table": "*i64", "count": "i32", "hyper": "*fp64", "v_mean_ptr": "*fp64"},
                    {"L1": l1, "AMSGRAD": amsgrad, "HAS_V": has_v, "P": tl.bfloat16, "G": tl.bfloat16,
                     "S": tl.float32, "A": tl.float32, "ACC": tl.float32, "P_VIA_FP32": False, "CHUNK": 4096,
                     "STEPS": 5})
    for amsgrad, acc in ((False, tl.float32), (True, tl.float64)):
        compile_one(ta._v_hat_sum_kernel, {"table": "*i64", "count": "i32", "partials": "*fp64", "first_partial": "i32",
                                           "beta2_ptr": "*fp64"},
                    {"AMSGRAD": amsgrad, "G": tl.float32, "S": tl.float32 if acc == tl.float32 else tl.float64,
                     "ACC": acc, "CHUNK": 4096, "STEPS": 5})
    print("every L2 / EWC / AdamR Triton kernel compiles for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
