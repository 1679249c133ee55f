"""Compiles every Triton kernel of the orthogonality losses to PTX for sm_90 and sm_80 without a GPU.

Covers `feature_orthogonality` (ntkcl_fast/triton/ortho.py), `projection_residual` (projection.py),
`gram_orthogonality` and `cross_orthogonality` (gram.py) and `ntkcl_contrastive` (contrastive.py),
forward and backward, for fp32, bf16 and fp16 inputs, with the signatures and constexpr values their
host launchers pass at a representative shape: B = 256 rows, K = 200 prototypes, D = 768 features,
a basis of rank 40 (padded to 64) plus the wide-rank configurations (padded 256 with the default
pipelining, padded 512 with one stage and 8 warps), N = 256 rows for the contrastive op (int64,
int32 and bool labels), and layer lists for gram / cross with one dtype and with old and new sides
of different dtypes (the MIXED panels).

Why: the tests run the kernels under the interpreter (TRITON_INTERPRET=1), which executes them
with NumPy and does not type-check them the way the compiler does: a dtype mismatch in a `tl.dot`,
an operation a target lacks (the contrastive op's fp64 `tl.dot` and fp64 scalar arguments), or a
tile that needs more shared memory than a GPU has, all pass there and only fail on a GPU. This
compiles each variant for both targets (sm_80: A100; sm_90: H100 / H200) and checks the shared
memory each needs against what one block may use there, so such errors show up on a machine
without a GPU.

Scalar arguments are specialized as the launcher's JIT does: an int equal to 1 (a unit stride, a
one-layer list) becomes a constant, a multiple of 16 is marked divisible by 16, and pointers are
marked 16-byte aligned except the sliced ones (`partials[first:]`) that need not be.

Prints one line per kernel variant and target; exits 0 when every variant compiles and fits, 1
otherwise, with the errors. Run with TRITON_INTERPRET unset:
`python scripts/compile_triton_ortho.py`. The variants compile in parallel, one process per CPU
(about 3 minutes on 2 CPUs with an empty Triton cache; compiled variants are cached).
"""
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# the kernels of this checkout, not of whichever copy of the package is installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ntkcl_fast.triton import contrastive as tc  # noqa: E402
from ntkcl_fast.triton import gram as tg  # noqa: E402
from ntkcl_fast.triton import ortho as to  # noqa: E402
from ntkcl_fast.triton import projection as tp  # noqa: E402

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
# shared memory one block may use (opt-in maximum): H100 / H200 227 KiB, A100 163 KiB
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}

B, K, D, N = 256, 200, 768, 256


class Unaligned(str):
    """A pointer type whose address need not be a multiple of 16 bytes (a slice at any offset)."""


def specialize(fn, args: dict, consts: dict):
    """(signature, constexprs, attrs) for `fn`, as triton.runtime.jit builds them from the values a
    launcher passes. args: name -> type string ("*fp32", "fp64"; pointers aligned unless Unaligned)
    or a representative int value."""
    sig, constexprs, attrs = {}, dict(consts), {}
    missing = [a for a in fn.arg_names if a not in args and a not in consts]
    extra = [a for a in list(args) + list(consts) if a not in fn.arg_names]
    if missing or extra:
        raise TypeError(f"{fn.__name__}: arguments missing {missing}, unknown {extra}")
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"{fn.__name__}.{name}: give a type string or an int, not {value!r}")
        if isinstance(value, int):
            if value == 1:
                sig[name], constexprs[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        else:
            sig[name] = str(value)
            divisible = value.startswith("*") and not isinstance(value, Unaligned)
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


class Variant:
    def __init__(self, module, fn, label: str, args: dict, consts: dict, options: dict | None = None):
        self.fn, self.args, self.consts, self.options = fn, args, consts, options or {}
        self.name = f"{module}.{fn.__name__} [{label}]"

    def compile(self, target: GPUTarget):
        sig, constexprs, attrs = specialize(self.fn, self.args, self.consts)
        src = ASTSource(fn=self.fn, signature=sig, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=target, options=self.options)
        if not kernel.asm.get("ptx"):
            raise RuntimeError("no PTX produced")
        return kernel


def _flags(**flags) -> str:
    return " ".join(f"{k}={int(v)}" for k, v in flags.items())


def ortho_variants():
    """feature_orthogonality: forward (value, S, norms) and the df / dp panels (both stride orders)."""
    common = {"EPS": to.EPS, "BM": to.BM, "BN": to.BN, "BK": to.BK}
    for dn, dt in DTYPES.items():
        x = f"*{dn}"
        for norm in (True, False):
            tag = f"{dn} {_flags(NORMALIZE=norm)}"
            tiles = dict(common, NORMALIZE=norm, KT=triton.cdiv(D, to.BK))
            yield Variant("ortho", to._fo_fwd_kernel, tag,
                          {"f_ptr": x, "p_ptr": x, "partials": "*fp32", "s_ptr": "*fp32", "f_norm_ptr": "*fp32",
                           "p_norm_ptr": "*fp32", "B": B, "K": K, "D": D}, tiles)
            panel = {"NORMALIZE": norm, "EPS": to.EPS, "BM": to.BM, "BD": to.BK, "BC": to.BN}
            grad_x = {"g_ptr": "*fp32", "y_ptr": x, "x_ptr": x, "out_ptr": x, "rowdot": "*fp32",
                      "inv_x_ptr": "*fp32", "inv_y_ptr": "*fp32", "D": D}
            # df: G [B, K] row-major, contracted over K; dp: G^T through swapped strides, over B
            yield Variant("ortho", to._fo_grad_x_kernel, f"{tag} df",
                          dict(grad_x, g_stride_r=K, g_stride_c=1, R=B, C=K),
                          dict(panel, CT=triton.cdiv(K, to.BN), PARTS=1))
            yield Variant("ortho", to._fo_grad_x_kernel, f"{tag} dp",
                          dict(grad_x, g_stride_r=1, g_stride_c=K, R=K, C=B),
                          dict(panel, CT=triton.cdiv(B, to.BN), PARTS=1))


def projection_variants():
    """projection_residual at rank 40 (RP 64) and the wide configurations: RP 256, the widest with the
    default pipelining, and RP 512 (the largest the launcher takes) with one stage and 8 warps."""
    for rank in (40, 256, 512):
        cfg = tp._Config(rank)
        for dn, dt in DTYPES.items():
            x = f"*{dn}"
            for norm in (True, False):
                for sumsq in (True, False):
                    tag = f"{dn} R={rank} RP={cfg.rp} BK={cfg.bk} {_flags(NORMALIZE=norm, SUMSQ=sumsq)}"
                    rows = {"NORMALIZE": norm, "SUMSQ": sumsq, "EPS": to.EPS, "BM": tp.BM, "BK": cfg.bk,
                            "RP": cfg.rp, "DT": triton.cdiv(D, cfg.bk)}
                    yield Variant("projection", tp._pr_fwd_kernel, tag,
                                  {"f_ptr": x, "u_ptr": x, "partials": "*fp32", "B": B, "D": D, "R": rank},
                                  rows, cfg.options)
                    scratch = {"f_ptr": x, "u_ptr": x, "c_ptr": "*fp32", "e_ptr": "*fp32", "inv_ptr": "*fp32",
                               "coef_ptr": "*fp32", "B": B, "D": D, "R": rank}
                    yield Variant("projection", tp._pr_bwd_rows_kernel, tag, dict(scratch, df_ptr=x), rows,
                                  cfg.options)
                    yield Variant("projection", tp._pr_bwd_basis_kernel, f"{tag} BB={cfg.bb}",
                                  dict(scratch, du_ptr=x),
                                  {"NORMALIZE": norm, "SUMSQ": sumsq, "BB": cfg.bb, "BK": cfg.bk, "RP": cfg.rp,
                                   "BT": triton.cdiv(B, cfg.bb)}, cfg.options)


def gram_variants():
    """gram / cross tile kernels (value and derivative buffer) and the gradient panels; lists of several
    layers (count > 1) and of one layer (count == 1 is a constant at launch)."""
    # gram: CODA-P's 5 layers, and one layer
    for count in (5, 1):
        for dn, dt in DTYPES.items():
            if count == 1 and dn != "fp32":
                continue
            steps = tg._steps(count)
            for mean in (True, False):
                # partials[first:] may start at any offset
                yield Variant("gram", tg._gram_tiles_kernel, f"{dn} count={count} {_flags(MEAN=mean)}",
                              {"table": "*i64", "count": count, "partials": Unaligned("*fp32"), "d_gram": "*fp32"},
                              {"MEAN": mean, "W": dt, "BT": tg.BT, "BK": tg.BK, "STEPS": steps})
            yield Variant("gram", tg._grad_panels_kernel, f"{dn}/{dn} count={count} MIXED=0",
                          {"table": "*i64", "count": count, "scratch": "*fp32"},
                          {"X": dt, "Y": dt, "MIXED": False, "BM": tg.BM, "BC": tg.BC, "BD": tg.BD, "STEPS": steps})
    # cross: O-LoRA's 24 layers; (old, new) dtype pairs, equal and mixed
    pairs = [(dn, dn) for dn in DTYPES] + [("fp32", "bf16"), ("bf16", "fp32"), ("fp16", "bf16"), ("fp32", "fp16")]
    count = 24
    for a_dn, b_dn in pairs:
        a_dt, b_dt = DTYPES[a_dn], DTYPES[b_dn]
        for l1 in (True, False):
            yield Variant("gram", tg._cross_tiles_kernel, f"{a_dn}/{b_dn} count={count} {_flags(L1=l1)}",
                          {"table": "*i64", "count": count, "partials": Unaligned("*fp32"), "d_products": "*fp32"},
                          {"L1": l1, "A": a_dt, "B": b_dt, "BT": tg.BT, "BK": tg.BK, "STEPS": tg._steps(count)})
        mixed = a_dn != b_dn
        for jobs in (2 * count, count):  # both sides need a gradient, or only the new one
            yield Variant("gram", tg._grad_panels_kernel, f"{a_dn}/{b_dn} count={jobs} MIXED={int(mixed)}",
                          {"table": "*i64", "count": jobs, "scratch": "*fp32"},
                          {"X": a_dt, "Y": b_dt, "MIXED": mixed, "BM": tg.BM, "BC": tg.BC, "BD": tg.BD,
                           "STEPS": tg._steps(jobs)})
    # one-layer cross list, mixed (count == 1 at launch)
    yield Variant("gram", tg._cross_tiles_kernel, "fp32/bf16 count=1 L1=1",
                  {"table": "*i64", "count": 1, "partials": "*fp32", "d_products": "*fp32"},
                  {"L1": True, "A": tl.float32, "B": tl.bfloat16, "BT": tg.BT, "BK": tg.BK, "STEPS": 1})
    yield Variant("gram", tg._grad_panels_kernel, "fp32/bf16 count=1 MIXED=1",
                  {"table": "*i64", "count": 1, "scratch": "*fp32"},
                  {"X": tl.float32, "Y": tl.bfloat16, "MIXED": True, "BM": tg.BM, "BC": tg.BC, "BD": tg.BD,
                   "STEPS": 1})


def contrastive_variants():
    """ntkcl_contrastive: fp64 norms, fp64 S tiles (fp64 tl.dot, stored as fp32), fp64 1/t, the
    fixed-order finish and the fp32 gradient panel (ortho's _fo_grad_x_kernel with G [N, N])."""
    dt_n, nt, ft = triton.cdiv(D, tc.BK), triton.cdiv(N, tc.BN), triton.cdiv(N, tc.FB)
    tiles = {"BM": tc.BM, "BN": tc.BN, "BK": tc.BK, "DT": dt_n, "NT": nt}
    # the launchers widen fp16 / bf16 features to fp32 before the norm and statistics kernels
    # (contrastive._fp32), so those compile for fp32 only; the gradient panel writes df in the
    # features' dtype
    f32 = "*fp32"
    yield Variant("contrastive", tc._nc_norm_kernel, "fp32",
                  {"f_ptr": f32, "inv64_ptr": "*fp64", "norm_ptr": "*fp32", "N": N, "D": D},
                  {"EPS": to.EPS, "BM": tc.BM, "BK": tc.BK, "DT": dt_n})
    for y in ("i64", "i32", "u8"):
        tag = f"fp32 labels={y}" + (" (bool)" if y == "u8" else "")
        yield Variant("contrastive", tc._nc_lse_kernel, tag,
                      {"f_ptr": f32, "y_ptr": f"*{y}", "inv_ptr": "*fp64", "stats_ptr": "*fp64", "s_ptr": "*fp32",
                       "N": N, "D": D, "inv_t": "fp64"}, tiles)
    for dn in DTYPES:
        yield Variant("contrastive", to._fo_grad_x_kernel, f"df {dn} NORMALIZE=1 G [N, N]",
                      {"g_ptr": "*fp32", "g_stride_r": N, "g_stride_c": 1, "y_ptr": f32, "x_ptr": f32,
                       "out_ptr": f"*{dn}", "rowdot": "*fp32", "inv_x_ptr": "*fp32", "inv_y_ptr": "*fp32", "R": N,
                       "C": N, "D": D},
                      {"NORMALIZE": True, "EPS": to.EPS, "BM": tc.BM, "BD": tc.BK, "BC": tc.BN,
                       "CT": triton.cdiv(N, tc.BN), "PARTS": 1})
    yield Variant("contrastive", tc._nc_finish_kernel, "fp64 stats",
                  {"stats_ptr": "*fp64", "out_ptr": "*fp32", "lse_pos_ptr": Unaligned("*fp32"), "N": N},
                  {"FB": tc.FB, "FT": ft})


VARIANTS: list = []  # (arch, Variant), filled by main before the worker processes fork


def _compile(index: int):
    """Compiles VARIANTS[index] in a worker; ("ok", shared, warps, stages, seconds) or ("error", line,
    details). The compiler's own diagnostics (C++ assertions, MLIR errors) go to fd 2: captured, so a
    failure reports them with its variant instead of interleaving them with the other workers'."""
    arch, v = VARIANTS[index]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            kernel = v.compile(TARGETS[arch])
            error = None
        except Exception as exc:  # noqa: BLE001 - every compile error is reported
            error = exc
            trace = traceback.format_exc()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        diagnostics = log.read().decode(errors="replace")
    if error is not None:
        keys = [ln.strip() for ln in diagnostics.splitlines()
                if "Assertion" in ln or "error:" in ln or "LLVM ERROR" in ln]
        first = (str(error).strip().splitlines() or [""])[0]
        line = f"{type(error).__name__}: {first}"
        if keys:  # the compiler's reason, e.g. a failed assertion, from its first line
            line += "; " + keys[0][keys[0].find("Assertion"):] if "Assertion" in keys[0] else "; " + keys[0]
        return "error", line, "\n".join(keys + [trace])
    return "ok", kernel.metadata.shared, kernel.metadata.num_warps, kernel.metadata.num_stages, \
        time.perf_counter() - t0


def _report(arch: str, v: Variant, result, failures: list) -> None:
    if result[0] == "ok":
        _, shared, warps, stages, seconds = result
        fits = shared <= SHARED_LIMIT[arch]
        print(f"{'ok  ' if fits else 'FAIL'} {arch} {v.name}: shared {shared} B, {warps} warps, {stages} stages, "
              f"{seconds:.1f} s", flush=True)
        if not fits:
            failures.append((arch, v.name, f"needs {shared} B of shared memory per block; {arch} allows "
                                           f"{SHARED_LIMIT[arch]} B, so the launch would fail"))
    else:
        print(f"FAIL {arch} {v.name}: {result[1]}", flush=True)
        failures.append((arch, v.name, result[2]))


def main() -> int:
    variants = [*ortho_variants(), *projection_variants(), *gram_variants(), *contrastive_variants()]
    VARIANTS[:] = [(arch, v) for arch in TARGETS for v in variants]
    workers = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    failures: list = []
    fork = multiprocessing.get_context("fork")
    crashed = []
    with ProcessPoolExecutor(workers, mp_context=fork) as pool:
        futures = [pool.submit(_compile, i) for i in range(len(VARIANTS))]
        for i, future in enumerate(futures):
            try:
                result = future.result()
            except BrokenProcessPool:  # a compiler abort killed a worker: retried one by one below
                crashed.append(i)
                continue
            _report(*VARIANTS[i], result, failures)
    for i in crashed:
        with ProcessPoolExecutor(1, mp_context=fork) as pool:
            try:
                result = pool.submit(_compile, i).result()
            except BrokenProcessPool:
                result = ("error", "the compiler aborted (process crashed)", "the compiler aborted")
        _report(*VARIANTS[i], result, failures)
    total = len(VARIANTS)
    print(f"{total - len(failures)} of {total} kernel variants compile for {', '.join(TARGETS)} "
          f"({time.perf_counter() - start:.0f} s, {workers} processes)")
    if failures:
        for arch, name, err in failures:
            print(f"\n=== {arch} {name}\n{err.rstrip()}", file=sys.stderr)
        return 1
    print("every orthogonality Triton kernel compiles for sm_90 and sm_80")
    return 0


if __name__ == "__main__":
    sys.exit(main())
