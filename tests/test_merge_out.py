"""merge_tensors(out=...) and the op merge_tensors_into_: the same bits as a new result on every
backend, into the given tensor; bad `out` rejected before anything is written."""
from __future__ import annotations

import pytest
import torch

from ntkcl_fast import _backend
from ntkcl_fast.merge import merge_tensors

from .test_merge_tensors import DTYPES, METHODS, _inputs, _same_bits

BACKENDS = ["torch"] + (["cpu"] if _backend.unavailable_reason("cpu", "cpu", "merge_tensors") is None else [])
needs_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled CPU kernel")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_out_holds_the_result(method, dtype, backend):
    base, models = _inputs(3, (41, 29), dtype, seed=5)
    b = None if method == "linear" else base
    kw = dict(method=method, weight=[0.6, -0.2, 1.1], density=[0.5, 0.3, 1.0], seed=9, key=4, backend=backend)
    want = merge_tensors(b, models, **kw)
    out = torch.full_like(base, float("nan"))  # every element must be written
    got = merge_tensors(b, models, out=out, **kw)
    assert got is out
    _same_bits(out, want)


@needs_cpu
def test_out_may_be_a_view_of_a_byte_buffer():
    base, models = _inputs(2, (7, 9), torch.bfloat16)
    buf = torch.zeros(2 * 63 + 40, dtype=torch.uint8)
    out = buf[:126].view(torch.bfloat16).view(7, 9)
    merge_tensors(base, models, method="ties", density=0.5, out=out)
    _same_bits(out, merge_tensors(base, models, method="ties", density=0.5))
    assert not buf[126:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_out_is_rejected_before_writing(backend):
    base, models = _inputs(2, (6, 4))
    kw = dict(method="task_arithmetic", backend=backend)
    cases = [(torch.zeros(6, 5), ValueError, "shape"), (torch.zeros(6, 4, dtype=torch.float64), ValueError, "dtype"),
             (torch.zeros(4, 6).t(), ValueError, "contiguous"), ([0.0] * 24, TypeError, "out must be a Tensor")]
    for out, error, match in cases:
        before = out.clone() if isinstance(out, torch.Tensor) else None
        with pytest.raises(error, match=match):
            merge_tensors(base, models, out=out, **kw)
        if before is not None:
            assert torch.equal(out, before)
    shared = torch.zeros(2, 6, 4)
    shared[0] = models[1]
    snapshot = shared.clone()
    with pytest.raises(ValueError, match="share memory"):
        merge_tensors(base, [models[0], shared[0]], out=shared.view(-1)[12:36].view(6, 4), **kw)
    assert torch.equal(shared, snapshot)
    merge_tensors(base, [models[0], shared[0]], out=shared[1], **kw)  # beside the input, not over it
    _same_bits(shared[1], merge_tensors(base, models, **kw))


@needs_cpu
def test_op_checks_out():
    op = torch.ops.ntkcl_fast.merge_tensors_into_
    base, models = _inputs(2, (5,))
    args = (base, models, "ties", [1.0, 1.0], [0.5, 0.5], 1.0, True, "none", 0, 0)
    with pytest.raises(ValueError, match="out must have the shape"):
        op(torch.empty(4), *args)
    with pytest.raises(TypeError, match="out must have the dtype"):
        op(torch.empty(5, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match="shares memory"):
        op(models[1], *args)
    out = torch.empty(5)
    op(out, *args)
    _same_bits(out, torch.ops.ntkcl_fast.merge_tensors(*args))


@needs_cpu
def test_opcheck_out():
    base, models = _inputs(2, (33,))
    torch.library.opcheck(torch.ops.ntkcl_fast.merge_tensors_into_,
                          (torch.empty(33), base, models, "dare_ties", [0.7, 0.4], [0.5, 0.6], 1.0, False, "l1", 1, 2))
