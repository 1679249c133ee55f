"""mergekit's YAML merge configuration for the methods we run (API.md, "Model merging").

Read as mergekit reads it (mergekit/config.py `evaluate_setting`, mergekit/plan.py): a
parameter set on a model wins over the same parameter in the global `parameters`, which wins
over the method's default; a setting is a scalar, a list of numbers interpolated over the layer
fraction t, or a list of `{filter, value}` entries. Anything mergekit would accept but we do not
run (other methods, slices, tokenizer unions, ...) is a ValueError, never silently ignored.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ._tensors import METHODS

RANDOM = ("dare_linear", "dare_ties")
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
# Parameters each method reads: per model (also settable globally as a default) and global only.
MODEL_PARAMS = {"linear": {"weight"}, "task_arithmetic": {"weight"}, "ties": {"weight", "density"},
                "dare_linear": {"weight", "density"}, "dare_ties": {"weight", "density"}}
GLOBAL_PARAMS = {"linear": {"normalize"}, "task_arithmetic": {"normalize", "rescale", "lambda", "int8_mask"}}
for _m in ("ties", "dare_linear", "dare_ties"):
    GLOBAL_PARAMS[_m] = GLOBAL_PARAMS["task_arithmetic"]
# mergekit's dtype names (mergekit/common.py dtype_from_name) plus float64, which our kernels run.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    parameters: dict  # name -> setting, as written


@dataclass(frozen=True)
class MergeConfig:
    method: str
    base: Path | None
    models: tuple[ModelSpec, ...]  # the models merged into the base (the base itself left out, except for linear)
    parameters: dict
    dtype: torch.dtype | None  # inputs are cast to it before merging (mergekit's `dtype`)
    out_dtype: torch.dtype | None  # the saved dtype; default `dtype`, then the base's
    tokenizer_source: Path | None
    text: str  # saved as merge_config.yml


@dataclass(frozen=True)
class TensorParams:
    """What one tensor is merged with: the keyword arguments of merge_tensors."""
    weight: tuple[float, ...]
    density: tuple[float, ...]
    lam: float
    normalize: bool | None
    rescale: str | None


def _model_path(value, where: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{where} must be a path to a model directory, got {value!r}")
    if isinstance(value, str) and "+" in value and not Path(value).exists():
        raise ValueError(f"{where}: LoRA references ('model+lora') are not supported, got {value!r}")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"{where}: model directory {str(value)!r} does not exist")
    return path


def _check_setting(setting, where: str) -> None:
    """A setting's shape as mergekit's ParameterSetting allows it."""
    if isinstance(setting, (bool, int, float, str)):
        return
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return
        for i, entry in enumerate(setting):
            if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
                raise ValueError(f"{where}[{i}] must be a {{filter, value}} mapping, got {entry!r}")
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise ValueError(f"{where}[{i}].filter must be a string, got {entry['filter']!r}")
            value = entry["value"]
            if not (isinstance(value, (bool, int, float, str)) or isinstance(value, list) and value
                    and all(isinstance(e, (bool, int, float, str)) for e in value)):
                raise ValueError(f"{where}[{i}].value must be a number or a list of numbers, got {value!r}")
        return
    raise ValueError(f"{where} must be a number, a list of numbers or a list of {{filter, value}}, got {setting!r}")


def evaluate(setting, name: str, t: float):
    """mergekit's `evaluate_setting`: the value of `setting` for tensor `name` at layer fraction t."""
    if not isinstance(setting, list):
        return setting
    if all(isinstance(e, (int, float)) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for entry in setting:
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or pattern in name:
            return evaluate(entry["value"], name, t)
    return None


def _parameters(value, where: str, allowed: set, method: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {value!r}")
    for key, setting in value.items():
        if key not in allowed:
            raise ValueError(f"{where}.{key} is not a parameter of merge_method {method!r} "
                             f"(it takes {sorted(allowed)})")
        _check_setting(setting, f"{where}.{key}")
    return dict(value)


def _dtype(value, key: str):
    if value is None:
        return None
    name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
    if name not in DTYPES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[name]


def load_config(config) -> MergeConfig:
    """Parse and check a mergekit config (a YAML path or a dict); ValueError naming the key."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config file {str(config)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config {str(config)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    elif isinstance(config, dict):
        raw, text = config, yaml.safe_dump(config, sort_keys=False)
    else:
        raise TypeError(f"config must be a path or a dict, got {type(config).__name__}")
    if not isinstance(raw, dict):
        raise ValueError("config must be a mapping of mergekit keys")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ValueError(f"config key {sorted(unknown)[0]!r} is not supported (supported: {sorted(TOP_KEYS)})")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise ValueError(f"merge_method must be one of {METHODS}, got {method!r}")
    base = _model_path(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    if base is None and method != "linear":
        raise ValueError(f"base_model is required for merge_method {method!r}")
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError("models must be a non-empty list of {model: PATH, parameters: {...}}")
    models = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise ValueError(f"models[{i}] must be a mapping with keys 'model' and optionally 'parameters', "
                             f"got {entry!r}")
        spec = ModelSpec(_model_path(entry["model"], f"models[{i}].model"),
                         _parameters(entry.get("parameters"), f"models[{i}].parameters", MODEL_PARAMS[method], method))
        # mergekit leaves the base out of the task vectors when it is listed among the models
        if method == "linear" or spec.path != base:
            models.append(spec)
    parameters = _parameters(raw.get("parameters"), "parameters", MODEL_PARAMS[method] | GLOBAL_PARAMS[method], method)
    if method == "linear" and base is not None and all(m.path != base for m in models):
        models.append(ModelSpec(base, {}))  # mergekit adds an unlisted base to a linear merge's inputs
    if not models:
        raise ValueError(f"models lists only the base_model: merge_method {method!r} needs another model")
    tokenizer = raw.get("tokenizer_source")
    if tokenizer == "union":
        raise ValueError("tokenizer_source 'union' is not supported (it rebuilds the vocabulary); "
                         "use 'base' or a model path")
    tokenizer = None if tokenizer in (None, "base") else _model_path(tokenizer, "tokenizer_source")
    cfg = MergeConfig(method, base, tuple(models), parameters, _dtype(raw.get("dtype"), "dtype"),
                      _dtype(raw.get("out_dtype"), "out_dtype"), tokenizer, text)
    tensor_params(cfg, "", 0.0)  # the global parameters' types, before any model is opened
    return cfg


def layer_index(name: str) -> int | None:
    """i of a decoder layer's tensor (`model.layers.i.`), None for embeddings, final norm, head."""
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_fraction(name: str, num_layers: int) -> float:
    """mergekit's t: layer i of n is at i / (n - 1) (1 for a single layer); the tensors outside
    the layers (embeddings, final norm, head) at 0, as mergekit plans them."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def _resolve(cfg: MergeConfig, key: str, name: str, t: float, spec: ModelSpec | None = None):
    for params in (spec.parameters if spec else {}, cfg.parameters):
        if key in params:
            value = evaluate(params[key], name, t)
            if value is not None:
                return value
    return None


def _number(value, what: str, *, unit: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if unit and not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return float(value)


def _flag(value, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def tensor_params(cfg: MergeConfig, name: str, t: float) -> TensorParams:
    """The merge arguments of tensor `name` at layer fraction `t`; ValueError naming model and tensor."""
    at = f" for tensor {name!r}" if name else ""
    weights, densities = [], []
    for spec in cfg.models:
        weight = _resolve(cfg, "weight", name, t, spec)
        if weight is None:
            if not name:
                continue  # checked per tensor: a filter list may cover only some tensors
            raise ValueError(f"model {str(spec.path)!r}: parameter weight is required{at}")
        weights.append(_number(weight, f"model {str(spec.path)!r}: weight{at}"))
        density = _resolve(cfg, "density", name, t, spec)
        densities.append(1.0 if density is None else _number(density, f"model {str(spec.path)!r}: density{at}",
                                                              unit=True))
    lam = _resolve(cfg, "lambda", name, t)
    lam = 1.0 if lam is None else _number(lam, f"parameters.lambda{at}")
    normalize = _flag(_resolve(cfg, "normalize", name, t), f"parameters.normalize{at}")
    _flag(_resolve(cfg, "int8_mask", name, t), f"parameters.int8_mask{at}")  # mergekit's mask memory only
    rescale = _resolve(cfg, "rescale", name, t)
    if rescale is None:
        rescale = "l1" if cfg.method in RANDOM else None  # mergekit's default_rescale=True for dare_*
    elif rescale is True or rescale is False:
        rescale = "l1" if rescale else "none"
    elif rescale not in ("density", "l1", "none"):
        raise ValueError(f"parameters.rescale{at} must be true, false, 'density', 'l1' or 'none', got {rescale!r}")
    if cfg.method not in RANDOM:
        if rescale not in (None, "none"):
            raise ValueError(f"parameters.rescale{at}: merge_method {cfg.method!r} does not rescale "
                             f"(only dare_linear and dare_ties do), got {rescale!r}")
        rescale = None
    return TensorParams(tuple(weights), tuple(densities), lam, normalize, rescale)
