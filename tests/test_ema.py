"""ema_update_ on every backend against the fp64 reference, bad inputs, opcheck."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import _backend
from ntkcl_fast.reference import ema as reference

from ._helpers import assert_unchanged, assert_within_budget, device_backends, interpreted_triton, snapshot

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = [(1,), (3,), (1023,), (65537,), (17, 33), (2, 3, 5)]
PAIRS = device_backends("ema_update_")


def _oracle(ema, src, decays):
    """fp64 copies through the reference."""
    out = [e.double() for e in ema]
    reference.ema_update_(out, [s.double() for s in src],
                          decays.double() if isinstance(decays, torch.Tensor) else decays)
    return out


def _eager(ema, src, decays):
    """What users write today (timm ModelEmaV3): lerp in the EMA's dtype."""
    out = [e.clone() for e in ema]
    for i, (e, s) in enumerate(zip(out, src)):
        d = decays if isinstance(decays, torch.Tensor) else decays[i]
        e.lerp_(s.to(e.dtype), (1 - d).to(e.dtype) if isinstance(d, torch.Tensor) else 1 - d)
    return out


def _check(ema, src, decays, device, backend):
    want = _oracle(ema, src, decays)
    eager = _eager(ema, src, decays)
    got = [e.clone() for e in ema]
    ntkcl_fast.ema_update_(got, src, decays, backend=backend)
    extra = 1 if interpreted_triton(backend, device) else 0
    for i, (g, w, e) in enumerate(zip(got, want, eager)):
        assert g.dtype == ema[i].dtype and g.shape == ema[i].shape
        assert_within_budget(g, w, e, extra_ulps=extra, what=f"pair {i} {ema[i].dtype}<-{src[i].dtype}")


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("ema_dtype,src_dtype", list(itertools.product(DTYPES, DTYPES)),
                         ids=lambda d: str(d).replace("torch.", ""))
def test_matches_reference_every_dtype_pair(device, backend, ema_dtype, src_dtype):
    gen = torch.Generator().manual_seed(0)
    ema = [torch.randn(s, generator=gen).to(device, ema_dtype) for s in SIZES]
    src = [torch.randn(s, generator=gen).to(device, src_dtype) for s in SIZES]
    _check(ema, src, [0.9, 0.0, 1.0, 0.999, 0.5, 0.25], device, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("count", [1, 7, 300])
def test_long_mixed_lists_one_call(device, backend, count):
    rng = random.Random(count)
    gen = torch.Generator().manual_seed(count)
    ema, src, decays = [], [], []
    for _ in range(count):
        shape = rng.choice([(rng.randint(1, 40),), (rng.randint(1, 9), rng.randint(1, 70)), (0,)])
        ema.append(torch.randn(shape, generator=gen).to(device, rng.choice(DTYPES)))
        src.append(torch.randn(shape, generator=gen).to(device, rng.choice(DTYPES)))
        decays.append(rng.random())
    _check(ema, src, decays, device, backend)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("decay_dtype", [torch.float32, torch.float64])
def test_decay_tensor_read_on_device(device, backend, decay_dtype):
    gen = torch.Generator().manual_seed(1)
    ema = [torch.randn(s, generator=gen).to(device) for s in SIZES]
    src = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in SIZES]
    _check(ema, src, torch.tensor(0.875, dtype=decay_dtype, device=device), device, backend)


def _interpreter_rounds(backend, device, ema_dtype, exact_in_bf16=False):
    """Triton's interpreter rounds fp32 -> bf16 its own way (not ties-to-even): one bf16 ulp,
    unless the value stored is a bf16 number already."""
    return interpreted_triton(backend, device) and ema_dtype == torch.bfloat16 and not exact_in_bf16


def _assert_bits(got, want, loose: bool, what: str):
    if loose:
        torch.testing.assert_close(got.double(), want.double(), rtol=2.0 ** -7, atol=0, msg=what)
    else:
        assert torch.equal(got, want), what


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("ema_dtype,src_dtype", list(itertools.product(DTYPES, DTYPES)),
                         ids=lambda d: str(d).replace("torch.", ""))
def test_decay_zero_copies_src_exactly(device, backend, ema_dtype, src_dtype):
    """Decay 0 is lerp weight 1: torch's `src - (src - ema) * 0` is src itself, where the textbook
    `ema + 1 * (src - ema)` is an ulp off on a third of the elements. Every decay form."""
    gen = torch.Generator().manual_seed(3)
    src = [torch.randn(s, generator=gen).to(device, src_dtype) for s in SIZES]
    want = [s.to(ema_dtype) for s in src]
    for decay in (0.0, [0.0] * len(SIZES), torch.tensor(0.0, device=device),
                  torch.tensor(0.0, dtype=torch.float64, device=device)):
        ema = [torch.randn(s, generator=gen).to(device, ema_dtype) for s in SIZES]
        ntkcl_fast.ema_update_(ema, src, decay, backend=backend)
        for i, (g, w) in enumerate(zip(ema, want)):
            _assert_bits(g, w, _interpreter_rounds(backend, device, ema_dtype, src_dtype == torch.bfloat16),
                         f"pair {i}, decay {decay!r}")


LERP_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
              (torch.float16, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("ema_dtype,src_dtype", LERP_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
def test_equals_torch_foreach_lerp_bit_for_bit(device, backend, ema_dtype, src_dtype):
    """timm ModelEmaV3 and torch's get_ema_multi_avg_fn update with `_foreach_lerp_(ema, src, 1 - decay)`
    (timm lerps `src.to(ema.dtype)` when the dtypes differ): the same bits on both sides of lerp's
    switch at weight 0.5, for float and 0-d tensor decays (fp64 and fp32)."""
    gen = torch.Generator().manual_seed(4)
    src = [torch.randn(s, generator=gen).to(device, src_dtype) for s in SIZES]
    start = [torch.randn(s, generator=gen).to(device, ema_dtype) for s in SIZES]
    for value in (0.0, 0.25, 0.5, 0.6180339887, 0.75, 0.999, 0.9999, 1.0):
        for decay in (value, torch.tensor(value, dtype=torch.float64, device=device),
                      torch.tensor(value, dtype=torch.float32, device=device)):
            weight = 1 - (decay.item() if isinstance(decay, torch.Tensor) else decay)  # what timm passes
            want = [e.clone() for e in start]
            torch._foreach_lerp_(want, [s.to(ema_dtype) for s in src], weight)
            got = [e.clone() for e in start]
            ntkcl_fast.ema_update_(got, src, decay, backend=backend)
            for i, (g, w) in enumerate(zip(got, want)):
                _assert_bits(g, w, _interpreter_rounds(backend, device, ema_dtype), f"pair {i}, decay {decay!r}")


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_contiguous_inputs(device, backend):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(33, 65, generator=gen).to(device)
    ema = [base.t(), torch.randn(9, 20, generator=gen).to(device)[:, ::3]]
    src = [torch.randn(65, 33, generator=gen).to(device, torch.bfloat16),
           torch.randn(20, 9, generator=gen).to(device).t()[:, 1::3]]
    want = _oracle(ema, src, [0.9, 0.3])
    ntkcl_fast.ema_update_(ema, src, [0.9, 0.3], backend=backend)
    for got, w in zip(ema, want):
        torch.testing.assert_close(got.double(), w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base.t().double(), want[0], rtol=1e-6, atol=1e-6)  # written through the view


@pytest.mark.parametrize("device,backend", PAIRS)
def test_empty_tensors_and_lists_are_no_ops(device, backend):
    ntkcl_fast.ema_update_([], [], 0.5, backend=backend)
    e = torch.empty(0, 4, device=device)
    ntkcl_fast.ema_update_([e], [torch.empty(0, 4, device=device)], 0.5, backend=backend)
    assert e.shape == (0, 4)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_floating_pairs_are_copied(device, backend):
    ema = [torch.zeros(5, dtype=torch.int64, device=device), torch.zeros(3, device=device),
           torch.zeros(2, dtype=torch.bool, device=device)]
    src = [torch.arange(5, device=device), torch.ones(3, device=device), torch.ones(2, dtype=torch.bool, device=device)]
    ntkcl_fast.ema_update_(ema, src, 0.75, backend=backend)
    assert ema[0].tolist() == [0, 1, 2, 3, 4]
    assert ema[1].tolist() == [0.25] * 3
    assert ema[2].tolist() == [True, True]


def test_single_tensors_are_accepted():
    e, s = torch.zeros(4), torch.ones(4)
    ntkcl_fast.ema_update_(e, s, 0.5)
    assert e.tolist() == [0.5] * 4


def test_no_autograd_history():
    p = torch.nn.Parameter(torch.randn(4))
    e = torch.zeros(4)
    ntkcl_fast.ema_update_(e, p, 0.5)
    assert e.grad_fn is None and not e.requires_grad


def _bad_calls(device):
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)
    shared = t(8)
    return [
        (ValueError, "src", lambda: ([t(3), t(3)], [t(3)], 0.5)),
        (ValueError, r"ema\[1\]", lambda: ([t(3), t(4)], [t(3), t(5)], 0.5)),
        (TypeError, r"ema\[0\]", lambda: ([t(3)], [t(3).long()], 0.5)),
        (TypeError, r"ema\[0\]", lambda: ([t(3, dtype=torch.complex64)], [t(3, dtype=torch.complex64)], 0.5)),
        (ValueError, "decay", lambda: ([t(3)], [t(3)], 1.5)),
        (ValueError, "decay", lambda: ([t(3)], [t(3)], float("nan"))),
        (ValueError, r"decay\[1\]", lambda: ([t(3), t(3)], [t(3), t(3)], [0.5, -0.1])),
        (ValueError, "decay", lambda: ([t(3), t(3)], [t(3), t(3)], [0.5])),
        (ValueError, "decay", lambda: ([t(3)], [t(3)], torch.tensor([0.5, 0.5], device=device))),
        (TypeError, "decay", lambda: ([t(3)], [t(3)], "0.5")),
        (TypeError, r"src\[1\]", lambda: ([t(3), t(3)], [t(3), "x"], 0.5)),
        (ValueError, r"src\[0\]", lambda: ([shared], [shared], 0.5)),
        (ValueError, r"ema\[1\]", lambda: ([shared[:5], shared[4:]], [t(5), t(4)], 0.5)),
        (ValueError, "backend", lambda: ([t(3)], [t(3)], 0.5, "fast")),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))))
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])  # auto: the compiled op's own checks
def test_bad_input_raises_before_writing(device, case, backend):
    error, names, make = _bad_calls(device)[case]
    args = make()
    written = [t for arg in args[:2] if isinstance(arg, list) for t in arg if isinstance(t, torch.Tensor)]
    before = snapshot(written)
    with pytest.raises(error, match=names):
        ntkcl_fast.ema_update_(*args[:3], backend=args[3] if len(args) > 3 else backend)
    assert_unchanged(written, before)


def test_cpu_decay_tensor_out_of_range_raises():
    e = torch.randn(3)
    before = e.clone()
    with pytest.raises(ValueError, match="decay"):
        ntkcl_fast.ema_update_(e, torch.randn(3), torch.tensor(1.5))
    assert torch.equal(e, before)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ntkcl_fast.ema_update_(torch.zeros(3), torch.ones(3), 0.5, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_raise():
    with pytest.raises(ValueError, match=r"src\[0\]"):
        ntkcl_fast.ema_update_([torch.zeros(3, device="cuda")], [torch.ones(3)], 0.5)


@pytest.mark.skipif(not ntkcl_fast.backends()["cuda"], reason="needs the CUDA kernels and a GPU")
def test_cuda_graph_capture_reads_decay_on_device():
    ema = [torch.zeros(1000, device="cuda"), torch.zeros(7, device="cuda", dtype=torch.bfloat16)]
    src = [torch.ones(1000, device="cuda", dtype=torch.bfloat16), torch.ones(7, device="cuda")]
    decay = torch.tensor(0.5, device="cuda")
    ntkcl_fast.ema_update_(ema, src, decay, backend="cuda")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ntkcl_fast.ema_update_(ema, src, decay, backend="cuda")
    for e in ema:
        e.zero_()
    decay.fill_(0.75)
    graph.replay()
    torch.cuda.synchronize()
    assert ema[0].eq(0.25).all() and ema[1].eq(0.25).all()


def test_reference_is_torchs_lerp_formula():
    """w = 1 - decay: w < 0.5 ? ema + w * (src - ema) : src - (src - ema) * (1 - w), each rounded
    once (emulated in fp64, where the product of two fp32 numbers is exact)."""
    gen = torch.Generator().manual_seed(5)
    e, s = torch.randn(4099, generator=gen), torch.randn(4099, generator=gen)
    diff = (s - e).double()
    for decay in (0.0, 0.3, 0.5, 0.75, 0.999):
        w = torch.tensor(1 - decay, dtype=torch.float32).double()
        want = (e.double() + w * diff if w < 0.5 else s.double() - diff * (1 - w)).float()
        got = e.clone()
        reference.ema_update_([got], [s], [decay])
        assert torch.equal(got, want), decay
    assert not torch.equal(e + 1.0 * (s - e), s)  # why the large-weight form matters at decay 0


@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p.values[1] in ("torch", "triton")])
def test_the_requested_backend_is_the_one_that_runs(device, backend, monkeypatch):
    """Guards the dispatch itself: a wrong branch would still give right numbers."""
    import ntkcl_fast.ema as api
    calls = []
    if backend == "torch":
        original = api.reference.ema_update_
        monkeypatch.setattr(api.reference, "ema_update_", lambda *a: calls.append(a) or original(*a))
    else:
        import ntkcl_fast.triton.ema as triton_ema
        original = triton_ema.ema_update_
        monkeypatch.setattr(triton_ema, "ema_update_", lambda *a: calls.append(a) or original(*a))
    ema = [torch.zeros(5, device=device), torch.zeros(3, device=device).expand(2, 3)[0]]
    ntkcl_fast.ema_update_(ema, [torch.ones(5, device=device), torch.ones(3, device=device)], 0.5, backend=backend)
    assert len(calls) == 1 and ema[0].eq(0.5).all()
