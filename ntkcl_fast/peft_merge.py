"""PEFT's `add_weighted_adapter` on `ntkcl_fast.merge_utils`, with one DARE mask per LoRA tensor.

PEFT's LoRA merge calls `dare_linear` / `dare_ties` once for every module's lora_A and once for
its lora_B, drawing from the global torch generator. Our drop-ins key the mask instead; used as
plain replacements, every call would get the same key and so the same drop pattern. Here each
merged tensor is keyed by its name: `tensor_key(f"{module}.lora_A")` and `".lora_B"` (or
`".lora_embedding_A"` / `".lora_embedding_B"` for embeddings; the module's own name for the SVD
combinations, which merge the module's delta weight), `module` the name in `LoraModel.model`
(PEFT's `key`), and adapter i of the list adds i to the key. The deterministic combinations
(linear, ties, magnitude_prune and their SVD forms) run our merges too and equal PEFT's.

    with patch_peft(seed=0):
        peft_model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", combination_type="dare_ties", density=0.5)

The patch replaces module globals of `peft.tuners.lora.model` for the duration of the `with`
block, like `unittest.mock.patch`: it is process-wide, not thread-safe, and nests.
"""
from __future__ import annotations

import contextlib
import functools
import threading

from . import merge_utils
from .random import as_u64, tensor_key

__all__ = ["add_weighted_adapter", "patch_peft"]

_MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_LORA_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))
_current = threading.local()  # the LoRA layer being merged: (module name, layer, path)


def _weights_of(layer, attr: str):
    entries = getattr(layer, attr, None) or {}
    return [getattr(v, "weight", v) for v in entries.values()]


def _tensor_name(task_tensors) -> str:
    """The name the merged tensor is keyed by: which of the layer's LoRA matrices the tasks are."""
    module, layer, path = _current.target
    if path == "svd":
        return module
    ptr = task_tensors[0].data_ptr()
    for pair in _LORA_PAIRS:
        for attr in pair:
            if any(w.data_ptr() == ptr for w in _weights_of(layer, attr)):
                return f"{module}.{attr}"
    raise RuntimeError(f"cannot tell which LoRA matrix of {module!r} PEFT is merging; "
                       f"this PEFT version passes tensors ntkcl_fast.peft_merge does not know")


def _keyed(seed: int, rescale, backend: str):
    """Our merges with PEFT's positional signatures; the DARE ones keyed by the tensor's name."""
    def dare_linear(task_tensors, weights, density):
        key = tensor_key(_tensor_name(task_tensors))
        return merge_utils.dare_linear(task_tensors, weights, density, rescale=rescale, seed=seed, key=key,
                                       backend=backend)

    def dare_ties(task_tensors, weights, density, majority_sign_method="total"):
        key = tensor_key(_tensor_name(task_tensors))
        return merge_utils.dare_ties(task_tensors, weights, density, majority_sign_method, rescale=rescale,
                                     seed=seed, key=key, backend=backend)

    def ties(task_tensors, weights, density, majority_sign_method="total"):
        return merge_utils.ties(task_tensors, weights, density, majority_sign_method, backend=backend)

    def magnitude_prune(task_tensors, weights, density):
        return merge_utils.magnitude_prune(task_tensors, weights, density, backend=backend)

    return {"task_arithmetic": merge_utils.task_arithmetic, "ties": ties, "dare_linear": dare_linear,
            "dare_ties": dare_ties, "magnitude_prune": magnitude_prune}


def _tracking(method, path: str):
    """Wrap a LoraModel per-layer merge method to record which layer it merges."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        target = kwargs["target"] if "target" in kwargs else args[3 if path == "generalized" else 4]
        names = getattr(_current, "names", None)
        if names is None or names[0] is not self or id(target) not in names[1]:
            names = (self, {id(m): n for n, m in self.model.named_modules()})
            _current.names = names
        previous = getattr(_current, "target", None)
        _current.target = (names[1][id(target)], target, path)
        try:
            return method(self, *args, **kwargs)
        finally:
            _current.target = previous
    return wrapper


@contextlib.contextmanager
def patch_peft(seed: int = 0, *, rescale="density", backend: str = "auto"):
    """Inside the block, LoRA's `add_weighted_adapter` merges with `ntkcl_fast.merge_utils`, each
    LoRA tensor's DARE mask keyed by its name under `seed`.

    `rescale`: "density" (PEFT's division by density), "l1" (mergekit) or "none".
    """
    from peft.tuners.lora import model as lora_model  # peft is optional: imported only when used

    seed = as_u64(seed, "seed")
    if rescale not in ("density", "l1", "none"):
        raise ValueError(f"rescale must be 'density', 'l1' or 'none', got {rescale!r}")
    cls = lora_model.LoraModel
    saved_functions = {name: getattr(lora_model, name) for name in _MERGES}
    saved_methods = {name: cls.__dict__[name] for name in ("_generalized_task_arithmetic_weighted_adapter",
                                                          "_svd_generalized_task_arithmetic_weighted_adapter")}
    try:
        for name, fn in _keyed(seed, rescale, backend).items():
            setattr(lora_model, name, fn)
        cls._generalized_task_arithmetic_weighted_adapter = _tracking(
            saved_methods["_generalized_task_arithmetic_weighted_adapter"], "generalized")
        cls._svd_generalized_task_arithmetic_weighted_adapter = _tracking(
            saved_methods["_svd_generalized_task_arithmetic_weighted_adapter"], "svd")
        yield
    finally:
        for name, fn in saved_functions.items():
            setattr(lora_model, name, fn)
        for name, method in saved_methods.items():
            setattr(cls, name, method)
        _current.names = None


def add_weighted_adapter(model, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                         svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                         majority_sign_method="total", *, seed: int = 0, rescale="density",
                         backend: str = "auto") -> None:
    """`model.add_weighted_adapter(...)` (a PeftModel or LoraModel, PEFT's arguments) inside `patch_peft`."""
    with patch_peft(seed, rescale=rescale, backend=backend):
        model.add_weighted_adapter(adapters, weights, adapter_name, combination_type=combination_type,
                                   svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                                   svd_driver=svd_driver, density=density,
                                   majority_sign_method=majority_sign_method)
