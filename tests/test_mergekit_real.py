"""merge_checkpoints against mergekit itself (the pinned PyPI release the Makefile installs).

Both tools merge the same YAML on the same tiny Llama checkpoints (fp32 tensors, a config.json
that transformers' LlamaConfig accepts, since mergekit builds the architecture from it).
- linear, task_arithmetic, ties: elementwise equal up to fp32 rounding (`fp32_bound`).
- dare_linear, dare_ties: mergekit draws its masks from torch's global RNG, so they cannot equal
  ours; both outputs are checked for the same semantics instead (kept fraction per tensor near
  the density, l1 rescale keeping ||delta||_1, the result being exactly the masked merge).

mergekit is imported unconditionally: `make test` installs it (Makefile TEST_DEPS), so an
environment without it fails here at collection instead of passing with this file skipped.
"""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

try:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
except ImportError as e:  # the message says how to get it, then collection fails
    raise ImportError(f"{e}: tests/test_mergekit_real.py needs mergekit (`pip install mergekit==0.1.5`, "
                      "which `make test` does)") from e

from ntkcl_fast.merge import merge_checkpoints

from ._mergekit_peer import generalized_task_arithmetic
from ._tiny_checkpoints import llama_tensors, write_hf_checkpoint

LAYERS, HIDDEN, VOCAB = 2, 64, 131
U = 2.0 ** -24  # fp32 unit roundoff
BUFFERS = {"model.position_ids"}  # non-floating; ours copies it from the base, mergekit's Llama layout has no such tensor


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base, two fine-tunes (m2 sharded, in reverse order), and `same`: a fine-tune whose delta has
    m1's sign everywhere with m2's magnitudes, so no TIES consensus drops a kept entry."""
    root = tmp_path_factory.mktemp("mk")
    shape = dict(layers=LAYERS, hidden=HIDDEN, vocab=VOCAB)
    base = llama_tensors(0, dtype=torch.float32, **shape)
    m1 = llama_tensors(1, dtype=torch.float32, base=base, **shape)
    m2 = llama_tensors(2, dtype=torch.float32, base=base, **shape)
    same = {n: base[n] + torch.sign(m1[n] - base[n]) * (m2[n] - base[n]).abs() if n not in BUFFERS else base[n]
            for n in base}
    tensors = {"base": base, "m1": m1, "m2": m2, "same": same}
    for name, t in tensors.items():
        write_hf_checkpoint(root / name, t, shards=2 if name == "m2" else 1, reverse=name == "m2", **shape)
    return root, tensors


def merge_both(root, tmp_path, cfg: dict):
    """(mergekit's tensors, ours) for one config, with the same names (ours' extra buffers checked
    and dropped); mergekit seeded, so the test is deterministic."""
    text = yaml.safe_dump(cfg)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              MergeOptions(lazy_unpickle=False, allow_crimes=True, write_model_card=False, quiet=True, random_seed=0))
    merge_checkpoints(yaml.safe_load(text), tmp_path / "ours", progress=False)
    theirs, ours = load_dir(tmp_path / "mk"), load_dir(tmp_path / "ours")
    assert set(ours) - set(theirs) == BUFFERS and set(theirs) <= set(ours)
    for name, t in theirs.items():
        assert t.dtype == ours[name].dtype == torch.float32 and t.shape == ours[name].shape, name
    base = load_dir(root / "base")
    for name in BUFFERS:
        assert torch.equal(ours.pop(name), base[name]), name
    return theirs, ours


def load_dir(directory):
    out = {}
    for f in directory.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def config(root, method, models, *, base=True, **parameters):
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": str(root / m), "parameters": p} for m, p in models]}
    if base:
        cfg["base_model"] = str(root / "base")
    if parameters:
        cfg["parameters"] = parameters
    return cfg


def fp32_bound(terms: list[torch.Tensor], divisor: float = 1.0) -> torch.Tensor:
    """How far two fp32 evaluations of the same sum of len(terms) products may differ elementwise.

    Each side forms every product, the sum, the division and the final add with one rounding
    each: at most (len(terms) + 2) roundings of at most U times the sum of magnitudes, so two
    evaluations in different orders differ by at most twice that (plus the same for the output
    rounding). Computed in fp64 from the exact terms."""
    mag = sum(t.abs() for t in terms) / abs(divisor)
    return 2 * (len(terms) + 3) * U * mag + 1e-30


EXACT = {
    "linear": dict(base=False, models=[("m1", {"weight": 0.7}), ("m2", {"weight": 0.45})], normalize=True),
    "task_arithmetic": dict(models=[("m1", {"weight": 0.6}), ("m2", {"weight": -0.3})], **{"lambda": 0.8}),
    "ties": dict(models=[("m1", {"weight": 0.6, "density": 0.5}), ("m2", {"weight": 0.4, "density": 0.7})]),
}


@pytest.mark.parametrize("method", list(EXACT))
def test_exact_methods_equal_mergekit(ckpts, tmp_path, method):
    root, tensors = ckpts
    spec = dict(EXACT[method])
    models, base = spec.pop("models"), spec.pop("base", True)
    theirs, ours = merge_both(root, tmp_path, config(root, method, models, base=base, **spec))
    b = tensors["base"]
    weights = [p["weight"] for _, p in models]
    for name, t in theirs.items():
        ms = [tensors[m][name].double() for m, _ in models]
        if method == "linear":
            bound = fp32_bound([w * m for w, m in zip(weights, ms)], sum(weights))
        else:
            bound = fp32_bound([b[name].double()] + [w * (m - b[name].double()) for w, m in zip(weights, ms)])
        if method == "ties":
            # the top-k selection must be unambiguous, or mergekit's unstable argsort may pick
            # other entries than ours at a tie: a fault of these inputs, not of either tool
            for (m, p), x in zip(models, ms):
                d = (x - b[name].double()).abs().flatten().float().sort(descending=True).values
                k = int(p["density"] * d.numel())
                assert k >= d.numel() or d[k - 1] > d[k], f"{name}: |delta| of {m} ties at the density threshold"
        err = (ours[name].double() - t.double()).abs()
        assert (err <= bound).all(), f"{name}: max |ours - mergekit| {err.max():.3g}, bound {bound.max():.3g}"


def binomial_tol(n: int, p: float) -> float:
    """5 standard deviations of a kept fraction over n independent draws, plus one element."""
    return 5 * math.sqrt(p * (1 - p) / n) + 1 / n


def test_dare_linear_l1_rescale_matches_mergekit_semantics(ckpts, tmp_path):
    """One model, so its mask and scale are visible in the output: kept fraction ~ density, and
    the l1 rescale (mergekit >= 0.1, `rescale: true`, its default) keeps ||w * delta||_1."""
    root, tensors = ckpts
    w, r = 0.7, 0.4
    b = tensors["base"]
    for out in merge_both(root, tmp_path, config(root, "dare_linear", [("m1", {"weight": w, "density": r})])):
        for name, t in out.items():
            d = (tensors["m1"][name] - b[name]).double()
            assert (d != 0).all(), f"{name}: a zero delta would hide the mask"
            delta = t.double() - b[name].double()
            kept = (delta != 0).double().mean().item()
            assert abs(kept - r) <= binomial_tol(d.numel(), r), f"{name}: kept {kept:.3f}, density {r}"
            # each output element rounds once (U |out|); the fp32 norms in the scale add a few U
            tol = U * (t.double().abs().sum() + 8 * math.log2(d.numel() + 1) * w * d.abs().sum())
            assert abs(delta.abs().sum() - w * d.abs().sum()) <= tol, name


def infer_masks(delta, terms):
    """Which models were kept at each element, from delta = sum_i kept_i * terms_i: the nearest of
    the 2^N sums (the caller checks that the output is that sum up to rounding)."""
    n = len(terms)
    combos = [[(c >> i) & 1 for i in range(n)] for c in range(2 ** n)]
    sums = torch.stack([sum(k * t for k, t in zip(c, terms)) for c in combos])
    best = (sums - delta).abs().argmin(dim=0)
    return [torch.tensor([c[i] for c in combos])[best].bool() for i in range(n)]


def test_dare_ties_is_the_masked_merge_in_both(ckpts, tmp_path):
    """Two models whose deltas agree in sign, without rescale: every output element is one of the
    four masked sums, from which the masks are read back; both tools must give masks of the asked
    density, independent between models, and exactly that masked merge (mergekit's own math,
    tests/_mergekit_peer.py, recomputed with the read-back masks)."""
    root, tensors = ckpts
    w, r = (0.6, 0.5), (0.3, 0.6)
    models = [("m1", {"weight": w[0], "density": r[0]}), ("same", {"weight": w[1], "density": r[1]})]
    b = tensors["base"]
    for out in merge_both(root, tmp_path, config(root, "dare_ties", models, rescale=False)):
        both = total = 0
        for name, t in out.items():
            base = b[name].double()
            terms = [wi * (tensors[m][name].double() - base) for wi, (m, _) in zip(w, models)]
            masks = infer_masks(t.double() - base, terms)
            for ri, mask in zip(r, masks):
                assert abs(mask.double().mean().item() - ri) <= binomial_tol(mask.numel(), ri), name
            both, total = both + (masks[0] & masks[1]).sum().item(), total + masks[0].numel()
            want = generalized_task_arithmetic(b[name], [tensors[m][name] for m, _ in models], list(w), list(r),
                                               consensus=True, sparsification="random", normalize=False,
                                               rescale_norm=None, lambda_=1.0, keeps=masks)
            bound = fp32_bound([base] + terms)
            assert ((t.double() - want.double()).abs() <= bound).all(), name
        assert abs(both / total - r[0] * r[1]) <= binomial_tol(total, r[0] * r[1])
