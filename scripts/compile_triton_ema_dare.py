"""Compiles the EMA and DARE Triton kernels to PTX for sm_80 and sm_90 without a GPU.

The interpreter (TRITON_INTERPRET=1, what CI runs) does not type-check kernels the way the
compiler does; this catches compile errors (e.g. an unsupported cast or a uint64 product) on
machines without a GPU. Exit 0 when every variant compiles for both targets. Run with
TRITON_INTERPRET unset: `python scripts/compile_triton_ema_dare.py`.
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

from ntkcl_fast.triton import dare as td  # noqa: E402
from ntkcl_fast.triton import ema as te  # noqa: E402

assert Path(td.__file__).resolve().parent.parent.parent == Path(__file__).resolve().parent.parent

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
C = "constexpr"


def compile_one(fn, pointers: dict, consts: dict) -> None:
    sig = dict(pointers, **{k: C for k in consts})
    for target in TARGETS:
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        assert kernel.asm.get("ptx"), f"{fn.__name__} sm_{target.arch}: no PTX"


def _ptr(dtype) -> str:
    return "*" + {tl.float16: "fp16", tl.bfloat16: "bf16", tl.float32: "fp32", tl.float64: "fp64"}[dtype]


def main() -> int:
    for e_dt, s_dt in ((tl.float32, tl.bfloat16), (tl.bfloat16, tl.float64), (tl.float16, tl.float16),
                       (tl.float16, tl.float64), (tl.float64, tl.float32)):
        acc = tl.float64 if tl.float64 in (e_dt, s_dt) else tl.float32
        for has_ptr in (False, True):
            compile_one(te._ema_kernel, {"table": "*i64", "count": "i32", "decays": "*fp64", "decay_ptr": "*fp64"},
                        {"HAS_DECAY_PTR": has_ptr, "E": e_dt, "S": s_dt, "ACC": acc,
                         "VIA_FP32": e_dt in (tl.float16, tl.bfloat16) and acc == tl.float64, "CHUNK": te.CHUNK, "STEPS": 5})
    for dt in (tl.float32, tl.bfloat16, tl.float64):
        acc = tl.float64 if dt == tl.float64 else tl.float32
        for (has_base, has_rows), aligned in zip(((True, False), (False, True), (True, True)), (True, False, True)):
            compile_one(td._dare_kernel, {"out": _ptr(dt), "fin": _ptr(dt), "base": _ptr(dt), "q_rows": _ptr(acc),
                                          "params": "*i64", "qbuf": _ptr(acc), "n": "i64", "inner": "i64",
                                          "offset": "i64"},
                        {"HAS_BASE": has_base, "HAS_ROWS": has_rows, "ALIGNED": aligned, "ACC": acc,
                         "BLOCK": td.BLOCK})
        compile_one(td._dare_multi_kernel, {"table": "*i64", "count": "i32", "keys": "*i64", "qs": _ptr(acc),
                                            "seed_lo": "*i64", "seed_hi": "*i64", "thresh": "*i64"},
                    {"E": dt, "ACC": acc, "BLOCK": td.BLOCK, "STEPS": 5})
    print("every EMA / DARE Triton kernel compiles for sm_80 and sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
