"""EMA benchmark: rows of the table (`rows(device, quick)`) and pytest-benchmark cases.

Every implementation does the same update, `ema <- decay * ema + (1 - decay) * src`, over a
whole parameter list: the baselines are what users write today (timm's ModelEmaV3 among them,
when timm is installed), the other rows are `ntkcl_fast.ema_update_` on each compiled backend
and `ModelEMA`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

import ntkcl_fast
from bench import sync, time_ms

DECAY = 0.999
DTYPES = {"fp32<-fp32": (torch.float32, torch.float32), "fp32<-bf16": (torch.float32, torch.bfloat16)}


def vit_shapes(dim: int, depth: int, classes: int = 1000, patch: int = 16, img: int = 224) -> list[tuple]:
    """Parameter shapes of a timm ViT (`vit_*_patch16_224`), in named_parameters() order."""
    tokens = (img // patch) ** 2 + 1
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    block = [(dim,), (dim,),                       # norm1
             (3 * dim, dim), (3 * dim,),           # attn.qkv
             (dim, dim), (dim,),                   # attn.proj
             (dim,), (dim,),                       # norm2
             (4 * dim, dim), (4 * dim,),           # mlp.fc1
             (dim, 4 * dim), (dim,)]               # mlp.fc2
    return shapes + block * depth + [(dim,), (dim,), (classes, dim), (classes,)]


def _numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


VIT_B = vit_shapes(768, 12)
assert len(VIT_B) == 152 and _numel(VIT_B) == 86_567_656, "ViT-B/16 must be 152 tensors, 86.6M elements"

# name -> shapes. Quick CPU runs use ViT-Ti; the large lists only make sense on a GPU.
LISTS = {
    "ViT-Ti/16": vit_shapes(192, 12),
    "ViT-B/16": VIT_B,
    "ViT-L/16": vit_shapes(1024, 24),
    "synthetic-1B": [(2048, 2048)] * 256,
}


def list_names(device: str, quick: bool) -> list[str]:
    if device == "cuda":
        return ["ViT-B/16"] if quick else ["ViT-B/16", "ViT-L/16", "synthetic-1B"]
    return ["ViT-Ti/16"] if quick else ["ViT-B/16"]


def make_lists(shapes, ema_dtype, src_dtype, device):
    gen = torch.Generator().manual_seed(0)
    ema = [torch.randn(s, generator=gen).to(device=device, dtype=ema_dtype) for s in shapes]
    src = [torch.randn(s, generator=gen).to(device=device, dtype=src_dtype) for s in shapes]
    return ema, src


def min_bytes(ema, src) -> int:
    """Read ema, read src, write ema: the least traffic any implementation can have."""
    return sum(e.numel() * (2 * e.element_size() + s.element_size()) for e, s in zip(ema, src))


class _Params(torch.nn.Module):
    """The model AveragedModel sees: a module holding `src` as its parameters (storage shared)."""

    def __init__(self, tensors):
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(t, requires_grad=False) for t in tensors)


def _averaged(src, ema_dtype, **fn):
    model = _Params(src)
    avg = AveragedModel(model, **fn).to(ema_dtype)  # an fp32 average of a bf16 model
    avg.update_parameters(model)  # the first call only copies; later calls average
    return lambda: avg.update_parameters(model)


# Each builder takes (ema, src, decay, ema_dtype, mixed) and returns the callable to time.
def _loop(ema, src, d, ema_dtype, mixed):
    def run():  # NTK-CL style; add_ promotes a bf16 src into the fp32 ema
        for e, s in zip(ema, src):
            e.mul_(d).add_(s, alpha=1 - d)
    return run


def _foreach(ema, src, d, ema_dtype, mixed):
    if mixed:  # _foreach_lerp_ needs matching dtypes, so the user converts src each step
        return lambda: torch._foreach_lerp_(ema, [s.to(ema_dtype) for s in src], 1 - d)
    return lambda: torch._foreach_lerp_(ema, src, 1 - d)


def _averaged_model(ema, src, d, ema_dtype, mixed):
    if mixed:  # get_ema_multi_avg_fn raises on mixed dtypes (foreach lerp); the per-tensor avg_fn works
        return _averaged(src, ema_dtype, avg_fn=get_ema_avg_fn(d))
    return _averaged(src, ema_dtype, multi_avg_fn=get_ema_multi_avg_fn(d))


def _timm_model_ema():
    """timm/utils/model_ema.py loaded by path (it needs torch only; the timm package imports
    torchvision), or None without timm."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    module_spec = importlib.util.spec_from_file_location("timm_utils_model_ema", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


TIMM = _timm_model_ema()


def _model_ema(make):
    """`make(model, decay, dtype)` -> an EMA with `.update(model)`; the model holds `src`."""
    def build(ema, src, d, ema_dtype, mixed):
        model = _Params(src)
        averaged = make(model, d, ema_dtype if mixed else None)
        return lambda: averaged.update(model)
    return build


def _ours(backend):
    def build(ema, src, d, ema_dtype, mixed):
        return lambda: ntkcl_fast.ema_update_(ema, src, d, backend=backend)
    return build


def _ours_averaged_model(ema, src, d, ema_dtype, mixed):
    return _averaged(src, ema_dtype, multi_avg_fn=ntkcl_fast.ema_multi_avg_fn(d))


def our_backends(device: str) -> list[str]:
    """Compiled backends for the device; Triton on CPU would only time its interpreter."""
    have = ntkcl_fast.backends()
    wanted = ["cuda", "triton"] if device == "cuda" else ["cpu"]
    return [b for b in wanted if have.get(b)]


def impls(device: str) -> list[tuple[str, str | None, object]]:
    """(label, baseline column or None for ntkcl_fast rows, builder)."""
    baselines = [
        ("loop mul_/add_", "loop", _loop),
        ("torch._foreach_lerp_", "foreach", _foreach),
        ("AveragedModel", "AveragedModel", _averaged_model),
    ]
    if TIMM is not None:  # timm's default stochastic rounding only acts on bf16 averages, not these
        baselines.append(("timm ModelEmaV3", "timm", _model_ema(
            lambda m, d, dtype: TIMM.ModelEmaV3(m, d, dtype=dtype, stochastic_rounding=False))))
    ours = [(f"ntkcl_fast[{b}]", None, _ours(b)) for b in our_backends(device)]
    ours.append(("AveragedModel+ntkcl_fast", None, _ours_averaged_model))
    ours.append(("ModelEMA", None, _model_ema(lambda m, d, dtype: ntkcl_fast.ModelEMA(m, d, dtype=dtype))))
    return baselines + ours


def rows(device: str, quick: bool) -> list[dict]:
    out = []
    for name in list_names(device, quick):
        shapes = LISTS[name]
        for dtype_name, (ema_dtype, src_dtype) in DTYPES.items():
            ema, src = make_lists(shapes, ema_dtype, src_dtype, device)
            mixed = ema_dtype != src_dtype
            nbytes = min_bytes(ema, src)
            for label, baseline, build in impls(device):
                fn = build(ema, src, DECAY, ema_dtype, mixed)
                t = time_ms(fn, device)
                out.append({
                    "op": "ema_update_", "list": name, "tensors": len(shapes), "elements": _numel(shapes),
                    "dtype": dtype_name, "impl": label, "baseline": baseline, "bytes": nbytes, **t,
                })
                print(f"  ema {name} {dtype_name} {label}: {t['ms']:.2f} ms (min {t['ms_min']:.2f})", flush=True)
                del fn  # frees an AveragedModel copy before the next row allocates its own
            del ema, src
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


# pytest-benchmark: ViT-Ti-sized lists (5.7M elements) so the whole file runs in about a minute.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=list(DTYPES), ids=list(DTYPES))
def lists(request):
    ema_dtype, src_dtype = DTYPES[request.param]
    ema, src = make_lists(LISTS["ViT-Ti/16"], ema_dtype, src_dtype, DEVICE)
    return request.param, ema, src


@pytest.mark.parametrize("label,build", [(label, build) for label, _, build in impls(DEVICE)],
                         ids=[label for label, _, _ in impls(DEVICE)])
def test_ema(benchmark, lists, label, build):
    dtype_name, ema, src = lists
    ema_dtype = ema[0].dtype
    fn = build(ema, src, DECAY, ema_dtype, src[0].dtype != ema_dtype)
    benchmark.group = f"ema ViT-Ti/16 {dtype_name}"
    benchmark.extra_info["min_bytes"] = min_bytes(ema, src)

    def timed():  # kernels are asynchronous on a GPU: time until the work is done
        fn()
        sync(DEVICE)

    benchmark(timed)


def host_overhead_us(backend: str = "auto", decay=DECAY, repeats: int = 2000) -> float:
    """Median per-call time of `ema_update_` on a list as long as ViT-B/16's (152 tensors) of one
    element each: the kernels do next to nothing, so this is the host cost of one call (argument
    checks, backend resolution, dispatch), the part that does not shrink with a faster device."""
    import statistics
    import time

    ema = [torch.randn(1) for _ in VIT_B]
    src = [torch.randn(1) for _ in VIT_B]
    for _ in range(20):
        ntkcl_fast.ema_update_(ema, src, decay, backend=backend)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ntkcl_fast.ema_update_(ema, src, decay, backend=backend)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


if __name__ == "__main__":  # `python -m bench.bench_ema`: the host cost per call, in microseconds
    for backend in ("cpu", "torch"):
        if ntkcl_fast.backends()[backend]:
            for label, d in (("float decay", DECAY), ("0-d tensor decay", torch.tensor(DECAY))):
                print(f"ema_update_ ViT-B/16 list, {backend}, {label}: {host_overhead_us(backend, d):.1f} us/call")
