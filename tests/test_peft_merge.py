"""ntkcl_fast.peft_merge with a real tiny PEFT LoRA model (no downloads; skipped without peft)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import ntkcl_fast
from ntkcl_fast import merge_utils, peft_merge
from ntkcl_fast.random import tensor_key

peft = pytest.importorskip("peft", reason="peft is not installed")
lora_model = pytest.importorskip("peft.tuners.lora.model")

MODULES = ["emb", "body.0", "body.2"]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 12)
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12))

    def forward(self, x):
        return self.body(self.emb(x))


def _model(n_adapters=3, seed=0):
    """LoRA r=4, alpha=4 (scaling 1) on every module, random A and B, adapters t0, t1, ..."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=MODULES, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Tiny(), cfg, adapter_name="t0")
        for i in range(1, n_adapters):
            model.add_adapter(f"t{i}", cfg)
    return model


def _lora(model, module, attr, adapter):
    layer = model.base_model.model.get_submodule(module)
    entry = getattr(layer, attr)[adapter]
    return getattr(entry, "weight", entry).detach()


def _attrs(module):
    return ("lora_embedding_A", "lora_embedding_B") if module == "emb" else ("lora_A", "lora_B")


def _new_adapter(model, name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if name in n.split(".")}


def test_each_lora_tensor_gets_its_own_mask():
    """Weights [1, 0, 0]: what survives in the merged tensor is adapter 0's mask, which must be the
    keep rule under tensor_key(module + ".lora_A" / ".lora_B")."""
    model = _model()
    peft_merge.add_weighted_adapter(model, ["t0", "t1", "t2"], [1.0, 0.0, 0.0], "m",
                                    combination_type="dare_linear", density=0.5, seed=3)
    masks = {}
    for module in MODULES:
        for attr in _attrs(module):
            merged = _lora(model, module, attr, "m")
            want = ntkcl_fast.dare_mask(merged.shape, 0.5, seed=3, key=tensor_key(f"{module}.{attr}"))
            assert torch.equal(merged != 0, want), (module, attr)
            masks[f"{module}.{attr}"] = want.reshape(-1)
    flat = list(masks.values())
    same_size = [(a, b) for i, a in enumerate(flat) for b in flat[i + 1:] if a.numel() == b.numel()]
    assert len(same_size) >= 6 and all(not torch.equal(a, b) for a, b in same_size)


def test_adapter_i_adds_i_to_the_key():
    model = _model()
    peft_merge.add_weighted_adapter(model, ["t0", "t1", "t2"], [0.0, 0.0, 1.0], "m",
                                    combination_type="dare_linear", density=0.4, seed=9)
    merged = _lora(model, "body.2", "lora_B", "m")
    assert torch.equal(merged != 0, ntkcl_fast.dare_mask(merged.shape, 0.6, seed=9,
                                                         key=tensor_key("body.2.lora_B") + 2))


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties", "dare_linear_svd"])
def test_masks_are_reproducible_for_a_seed(combination):
    runs = []
    for seed in (5, 5, 6):
        model = _model()
        peft_merge.add_weighted_adapter(model, ["t0", "t1"], [0.7, 0.5], "m", combination_type=combination,
                                        density=0.5, seed=seed)
        runs.append(_new_adapter(model, "m"))
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 2 * len(MODULES)
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_is_our_merge_on_the_lora_tensors(method):
    """The merged lora_A / lora_B are merge_utils.dare_ties over PEFT's sqrt-split weights."""
    model = _model()
    weights = [0.8, -0.3, 0.5]
    peft_merge.add_weighted_adapter(model, ["t0", "t1", "t2"], weights, "m", combination_type="dare_ties",
                                    density=0.6, majority_sign_method=method, seed=1, rescale="l1")
    w_a = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in weights])
    w_b = torch.tensor([math.sqrt(abs(w)) for w in weights])
    for module in MODULES:
        for attr, w in zip(_attrs(module), (w_a, w_b)):
            tasks = [_lora(model, module, attr, f"t{i}") for i in range(3)]
            want = merge_utils.dare_ties(tasks, w, 0.6, method, rescale="l1", seed=1, key=tensor_key(f"{module}.{attr}"))
            assert torch.equal(_lora(model, module, attr, "m"), want), (module, attr)


def test_svd_combinations_key_the_module_delta(monkeypatch):
    keys = []
    real = merge_utils.dare_linear

    def spy(*args, key, **kwargs):
        keys.append(key)
        return real(*args, key=key, **kwargs)

    monkeypatch.setattr(merge_utils, "dare_linear", spy)
    peft_merge.add_weighted_adapter(_model(), ["t0", "t1"], [0.5, 0.5], "s", combination_type="dare_linear_svd",
                                    density=0.5)
    assert sorted(keys) == sorted(tensor_key(m) for m in MODULES)
    keys.clear()
    peft_merge.add_weighted_adapter(_model(), ["t0", "t1"], [0.5, 0.5], "l", combination_type="dare_linear",
                                    density=0.5)
    assert sorted(keys) == sorted(tensor_key(f"{m}.{a}") for m in MODULES for a in _attrs(m))


DETERMINISTIC = [("linear", {}), ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign_method":
                 "frequency"}), ("magnitude_prune", {"density": 0.4}), ("svd", {}), ("ties_svd", {"density": 0.5}),
                 ("magnitude_prune_svd", {"density": 0.5})]


@pytest.mark.parametrize("combination,kwargs", DETERMINISTIC, ids=[c for c, _ in DETERMINISTIC])
def test_deterministic_combinations_equal_peft(combination, kwargs):
    theirs = _model()
    ours = copy.deepcopy(theirs)
    weights = [0.6, -0.9, 0.4]
    theirs.add_weighted_adapter(["t0", "t1", "t2"], weights, "m", combination_type=combination, **kwargs)
    peft_merge.add_weighted_adapter(ours, ["t0", "t1", "t2"], weights, "m", combination_type=combination, **kwargs)
    want, got = _new_adapter(theirs, "m"), _new_adapter(ours, "m")
    assert want.keys() == got.keys() and want
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n


def test_patch_is_undone_even_on_error():
    before = {n: getattr(lora_model, n) for n in ("dare_linear", "dare_ties", "ties", "task_arithmetic",
                                                  "magnitude_prune")}
    method = lora_model.LoraModel.__dict__["_generalized_task_arithmetic_weighted_adapter"]
    with pytest.raises(ValueError):
        peft_merge.add_weighted_adapter(_model(), ["t0", "t1"], [0.5, 0.5], "m", combination_type="dare_linear",
                                        density=-0.5)
    with peft_merge.patch_peft(seed=1):
        assert lora_model.dare_linear is not before["dare_linear"]
        with peft_merge.patch_peft(seed=2):
            pass
        assert lora_model.dare_linear is not before["dare_linear"]
    assert {n: getattr(lora_model, n) for n in before} == before
    assert lora_model.LoraModel.__dict__["_generalized_task_arithmetic_weighted_adapter"] is method
    with pytest.raises(ValueError, match="rescale"):
        with peft_merge.patch_peft(rescale="l2"):
            pass
