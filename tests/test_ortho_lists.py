"""gram_orthogonality and cross_orthogonality over layer lists on every backend against the fp64 reference."""
from __future__ import annotations

import pytest
import torch

import ntkcl_fast
from ntkcl_fast.reference import ortho as reference

from ._ortho_helpers import DTYPES, cases, check, eager_cross, eager_gram, pairs, rand


# ----------------------------------------------------------------------------- gram_orthogonality

GRAM_LISTS = {
    "one-1x1": [(1, 1)],
    "mixed": [(3, 7), (16, 33), (1, 5), (8, 64)],
    "24-layers": [(8, 64)] * 24,
    "coda-p": [(10, 768)] * 5,  # large: not on the interpreter
    "coda-p-pool": [(100, 768)] * 2,
}
_LISTS_COMBOS = [(dt, red) for dt in DTYPES for red in ("mean", "sum")]


@pytest.mark.parametrize("device,backend,case,dtype,reduction",
                         cases(pairs("gram_orthogonality"), list(GRAM_LISTS)[:3], list(GRAM_LISTS)[3:],
                                _LISTS_COMBOS, _LISTS_COMBOS))
def test_gram_orthogonality(device, backend, case, dtype, reduction):
    shapes = GRAM_LISTS[case]
    gen = torch.Generator().manual_seed(len(shapes))
    ws = [rand(gen, s, device, dtype, s[1] ** -0.5) for s in shapes]

    def fast(*ws):
        return ntkcl_fast.gram_orthogonality(list(ws), reduction=reduction, backend=backend)

    check(fast, lambda *ws: reference.gram_orthogonality(list(ws), reduction), eager_gram(reduction), ws,
           backend=backend, device=device, what=f"gram {case}")


# ----------------------------------------------------------------------------- cross_orthogonality

CROSS_LISTS = {
    "one-1x1": ([(1, 1)], [(1, 1)]),
    "mixed": ([(3, 7), (16, 33), (8, 64)], [(5, 7), (8, 33), (1, 64)]),
    "24-layers": ([(8, 64)] * 24, [(8, 64)] * 24),
    "o-lora-12": ([(8, 768)] * 12, [(8, 768)] * 12),  # large: not on the interpreter
    "o-lora-old-tasks": ([(40, 1536)] * 3, [(8, 1536)] * 3),
}
_CROSS_COMBOS = [(dt, nm) for dt in DTYPES for nm in ("l1", "fro2")]


@pytest.mark.parametrize("device,backend,case,dtype,norm",
                         cases(pairs("cross_orthogonality"), list(CROSS_LISTS)[:3], list(CROSS_LISTS)[3:],
                                _CROSS_COMBOS, _CROSS_COMBOS))
def test_cross_orthogonality(device, backend, case, dtype, norm):
    old_s, new_s = CROSS_LISTS[case]
    gen = torch.Generator().manual_seed(len(old_s))
    old = [rand(gen, s, device, dtype, s[1] ** -0.5) for s in old_s]
    new = [rand(gen, s, device, dtype, s[1] ** -0.5) for s in new_s]
    n = len(old)

    def fast(*ts):
        return ntkcl_fast.cross_orthogonality(list(ts[:n]), list(ts[n:]), norm=norm, backend=backend)

    check(fast, lambda *ts: reference.cross_orthogonality(ts[:n], ts[n:], norm), eager_cross(norm, n),
           old + new, backend=backend, device=device, what=f"cross {case}")


@pytest.mark.parametrize("frozen", ["old", "new"])
@pytest.mark.parametrize("norm", ["l1", "fro2"])
@pytest.mark.parametrize("device,backend", pairs("cross_orthogonality"))
def test_cross_orthogonality_one_side_frozen(device, backend, norm, frozen):
    """O-LoRA freezes the old tasks' matrices: the trained side's gradient is unchanged and the
    frozen side gets none."""
    gen = torch.Generator().manual_seed(5)
    old = [rand(gen, s, device, torch.float32) for s in [(6, 16), (4, 24)]]
    new = [rand(gen, s, device, torch.float32) for s in [(3, 16), (2, 24)]]
    train = new if frozen == "old" else old
    for t in train:
        t.requires_grad_()
    out = ntkcl_fast.cross_orthogonality(old, new, norm=norm, backend=backend)
    grads = torch.autograd.grad(out, train)
    o64 = [t.detach().double().requires_grad_(frozen == "new") for t in old]
    n64 = [t.detach().double().requires_grad_(frozen == "old") for t in new]
    ref = reference.cross_orthogonality(o64, n64, norm)
    want = torch.autograd.grad(ref, n64 if frozen == "old" else o64)
    torch.testing.assert_close(out.double().cpu(), ref.detach().cpu(), rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=1e-5, atol=1e-5)
    assert all(t.grad is None for t in (old if frozen == "old" else new))



@pytest.mark.parametrize("device,backend", pairs("gram_orthogonality"))
def test_lists_of_mixed_dtypes(device, backend):
    """One call over layers stored in different dtypes (fp32 and bf16 adapters side by side)."""
    gen = torch.Generator().manual_seed(41)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    ws = [rand(gen, s, device, dt, 0.3) for s, dt in zip([(3, 7), (16, 33), (1, 5), (8, 64)], dtypes)]
    old = [rand(gen, s, device, dt, 0.3) for s, dt in zip([(3, 7), (16, 33), (8, 64)], dtypes)]
    new = [rand(gen, s, device, dt, 0.3) for s, dt in zip([(5, 7), (8, 33), (1, 64)], dtypes)]
    for reduction in ("mean", "sum"):
        check(lambda *w: ntkcl_fast.gram_orthogonality(list(w), reduction=reduction, backend=backend),
               lambda *w: reference.gram_orthogonality(list(w), reduction), eager_gram(reduction), ws,
               backend=backend, device=device, what=f"gram mixed {reduction}")
    for norm in ("l1", "fro2"):
        check(lambda *t: ntkcl_fast.cross_orthogonality(list(t[:3]), list(t[3:]), norm=norm, backend=backend),
               lambda *t: reference.cross_orthogonality(t[:3], t[3:], norm), eager_cross(norm, 3), old + new,
               backend=backend, device=device, what=f"cross mixed {norm}")


