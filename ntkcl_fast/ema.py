"""EMA / parameter averaging: `ema_update_`, `ModelEMA` (timm ModelEmaV3 drop-in), `ema_multi_avg_fn`."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch

from . import _backend, _validate, distributed, distributed_ema
from ._host_staging import HostStaging
from ._model_ema_plan import UpdatePlan, buffers as _buffers, pairs as _pairs
from ._value_checks import checked_values
from .random import as_i64, as_u64, philox_words
from .reference import ema as reference


# One fake kernel for both ops of the same schema (the extension's and the Triton one).
def _ema_update_fake(ema, src, decay, decay_tensor):
    torch._check(len(ema) == len(src), lambda: "ema and src must have the same length")
    for i, (e, s) in enumerate(zip(ema, src)):
        torch._check(e.shape == s.shape, lambda: f"ema[{i}] and src[{i}] must have the same shape")


if _backend._C is not None:
    torch.library.register_fake("ntkcl_fast::ema_update_")(_ema_update_fake)


@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::ema_update_", mutates_args=("ema",))
def _triton_ema_update_(ema: list[torch.Tensor], src: list[torch.Tensor], decay: list[float],
                        decay_tensor: torch.Tensor | None) -> None:
    from .triton.ema import ema_update_ as launch
    launch(ema, src, decay, decay_tensor)


_triton_ema_update_.register_fake(_ema_update_fake)


def _check_pairs(ema: list[torch.Tensor], src: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Every per-pair check, before anything is written: (floating pair indices, other pair indices)."""
    _validate.same_shapes(ema, "ema", src, "src")
    _validate.one_device([("ema", ema), ("src", src)])
    floating, other = [], []
    for i, (e, s) in enumerate(zip(ema, src)):
        if e.is_complex() or s.is_complex():
            raise TypeError(f"ema[{i}]/src[{i}] are complex, which EMA does not support")
        if e.is_floating_point() != s.is_floating_point():
            raise TypeError(f"ema[{i}] ({e.dtype}) and src[{i}] ({s.dtype}) must both be floating or both not")
        if e.is_floating_point():
            for arg, t in (("ema", e), ("src", s)):
                if t.dtype not in _validate.FLOATING:
                    raise TypeError(f"{arg}[{i}] has unsupported dtype {t.dtype}; supported: fp16, bf16, fp32, fp64")
            floating.append(i)
        else:
            other.append(i)
    _validate.no_broadcast_outputs(ema, "ema")
    _validate.no_overlap(ema, "ema", src, "src")
    return floating, other


def _decay_args(decay, n: int, device: torch.device | None,
                kernel_checks: bool) -> tuple[list[float], torch.Tensor | None]:
    """(per-pair floats, None) or ([], 0-d tensor). `kernel_checks`: the compiled op range-checks a
    CPU decay tensor itself (a CUDA one is read on device and not checked: that would sync)."""
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0:
            raise ValueError(f"decay must be a 0-d tensor, got shape {tuple(decay.shape)}")
        if decay.dtype not in _validate.FLOATING:
            raise TypeError(f"decay must be a floating tensor, got {decay.dtype}")
        if device is not None and decay.device != device:
            raise ValueError(f"decay must be on the tensors' device {device}, got {decay.device}")
        if decay.device.type == "cpu" and not kernel_checks:
            return [], checked_values(decay.detach(), "unit", "decay")
        return [], decay.detach()
    if isinstance(decay, Sequence) and not isinstance(decay, (str, bytes)):
        if len(decay) != n:
            raise ValueError(f"decay must have one value per pair ({n}), got {len(decay)}")
        return [_validate.unit_interval(d, f"decay[{i}]") for i, d in enumerate(decay)], None
    return [_validate.unit_interval(decay, "decay")] * n, None


def _run(backend: str, ema: list[torch.Tensor], src: list[torch.Tensor],
         decays: list[float], decay_t: torch.Tensor | None) -> None:
    if backend == "torch":
        reference.ema_update_(ema, src, decay_t if decay_t is not None else decays)
        return
    ema_work, src_work = _backend.dense(ema), _backend.dense(src)
    _backend.kernel(backend, "ema_update_")(ema_work, src_work, decays, decay_t)
    _backend.write_back(ema, ema_work)


@torch.no_grad()
def ema_update_(ema, src, decay, *, backend: str = "auto") -> None:
    """In place `ema[i] <- torch.lerp(ema[i], src[i], 1 - d_i)` for every pair, in one fused call:
    `ema + (1 - d) * (src - ema)` in torch's own rounding, so decay 0 copies src exactly and fp32
    results equal `torch._foreach_lerp_` (timm ModelEmaV3) bit for bit.

    Non-floating pairs (int/bool buffers) are copied. `decay` is a float, one float per pair, or
    a 0-d floating tensor on the tensors' device (read on device, so CUDA graphs can capture
    the call; a CUDA decay tensor is not range-checked, since that would need a host sync).
    Every check runs before the first write.
    """
    ema = _validate.tensor_list(ema, "ema")
    src = _validate.tensor_list(src, "src")
    _validate.same_length(ema, "ema", src, "src")
    if ema and distributed.is_dtensor(ema[0]):
        distributed.ema_update_(ema, src, decay, backend)
        return
    device = ema[0].device if ema else torch.device("cpu")
    name = _backend.resolve(backend, device, "ema_update_")
    if name in ("cpu", "cuda") and all(t.is_contiguous() for t in ema) and all(t.is_contiguous() for t in src):
        # The compiled op checks shapes, dtypes, devices, aliasing and the decay itself, before any
        # write, naming argument and index: a Python loop over a model would cost more than the kernel.
        decays, decay_t = _decay_args(decay, len(ema), device if ema else None, kernel_checks=True)
        if ema:  # an op with no tensor arguments has no device to dispatch on
            torch.ops.ntkcl_fast.ema_update_(ema, src, decays, decay_t)
        return
    floating, other = _check_pairs(ema, src)
    decays, decay_t = _decay_args(decay, len(ema), device if ema else None, kernel_checks=False)
    if floating:
        _run(name, [ema[i] for i in floating], [src[i] for i in floating],
             [decays[i] for i in floating] if decay_t is None else [], decay_t)
    for i in other:
        ema[i].copy_(src[i])


def ema_multi_avg_fn(decay: float = 0.999):
    """`AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.999))`: torch's `get_ema_multi_avg_fn`, fused."""
    decay = _validate.unit_interval(decay, "decay")

    @torch.no_grad()
    def ema_update(ema_param_list, current_param_list, _num_averaged):
        floating = [i for i, p in enumerate(ema_param_list) if p.is_floating_point()]
        ema_update_([ema_param_list[i] for i in floating], [current_param_list[i] for i in floating], decay)
        for p_ema, p_model in zip(ema_param_list, current_param_list):
            if not p_ema.is_floating_point():  # torch's own formula for integer buffers
                p_ema.copy_(p_ema * decay + p_model * (1 - decay))

    return ema_update


# An op of its own: inductor keeps `x.to(bf16).float()` in fp32 inside a fused kernel (it does not
# emulate precision casts by default), which would hide the rounding this function measures.
@torch.library.custom_op("ntkcl_fast_reference::stochastic_round_", mutates_args=("dst",))
def _stochastic_round_(dst: torch.Tensor, x: torch.Tensor, seed: int, key: int, step: torch.Tensor) -> None:
    """dst <- x (fp32) rounded to dst's dtype, up or down with probability by distance, so the
    expected value is x: a slow average (1 - decay below half an ulp) still moves. NaN and Inf
    stay as round-to-nearest gives them.

    The draws are the counter-based Philox of the DARE keep rule (key: the tensor's index, counter:
    element group plus `step` << 32), not a torch.Generator: reproducible from the seed on every
    device, and usable under torch.compile (the step is a tensor, so no recompile per update).
    """
    nearest = x.to(dst.dtype)
    near32 = nearest.float()
    toward = torch.where(near32 > x, float("-inf"), float("inf")).to(dst.dtype)
    other = torch.nextafter(nearest, toward)
    p_other = (x - near32).abs() / (other.float() - near32).abs()
    n = x.numel()
    counter = torch.arange((n + 3) // 4, dtype=torch.int64, device=x.device) + (step.to(x.device) << 32)
    draw = philox_words(counter, key, seed).reshape(-1)[:n].reshape(x.shape).double() * 2.0 ** -32
    dst.copy_(torch.where(draw < p_other, other, nearest))


@_stochastic_round_.register_fake
def _stochastic_round_fake(dst, x, seed, key, step):
    torch._check(dst.shape == x.shape, lambda: "dst and x must have the same shape")


class ModelEMA(torch.nn.Module):
    """Exponential moving average of a model's weights; a drop-in for timm's `ModelEmaV3`.

    Averages what timm averages (parameters and persistent buffers, or parameters alone with
    `exclude_buffers`, which copies every buffer) with timm's lerp, bit for bit when the average
    and the model share a dtype. Adds NTK-CL's `task_mean_decay`. With `stochastic_rounding`,
    fp16/bf16 averages are computed in fp32 and rounded stochastically (seeded by
    `stochastic_rounding_seed`) so a slow average does not stall; timm does so for bf16 only,
    by default, with other random draws. Every update is one fused `ema_update_` call per device.
    """

    # Positional arguments in timm ModelEmaV3's order (timm >= 1.0.31); `foreach` is accepted for
    # that drop-in and has no effect (every update is one fused call, whatever it says).
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, device=None, dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False, stochastic_rounding_seed: int | None = None,
                 foreach: bool = True, exclude_buffers: bool = False, *, backend: str = "auto"):
        super().__init__()
        _validate.unit_interval(decay, "decay")
        _validate.unit_interval(min_decay, "min_decay")
        if dtype is not None and dtype not in _validate.FLOATING:
            raise TypeError(f"dtype must be one of fp16, bf16, fp32, fp64, got {dtype}")
        model = distributed_ema.unwrap(model)
        # an FSDP2 model cannot be deep-copied: its average is kept as local shards, no `.module`
        self._sharded = None
        if distributed_ema.is_sharded(model):
            if stochastic_rounding:
                raise ValueError("stochastic_rounding is not supported for FSDP2-sharded models")
            self.module = None
            self._sharded = distributed_ema.ShardedAverage(model, dtype, device, persistent_only=not exclude_buffers)
        else:
            self.module = copy.deepcopy(model)
            self.module.eval()
            self.module.requires_grad_(False)
            if device is not None or dtype is not None:
                self.module.to(device=device, dtype=dtype)  # Module.to casts floating tensors only
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.device = device
        self.dtype = dtype
        self.foreach = foreach
        self.exclude_buffers = exclude_buffers
        self.backend = backend
        self.stochastic_rounding = bool(stochastic_rounding)
        self.stochastic_rounding_seed = stochastic_rounding_seed
        if stochastic_rounding_seed is None and self.stochastic_rounding:
            # from torch's generator, so torch.manual_seed repeats it (drawn only when asked for)
            stochastic_rounding_seed = int(torch.randint(0, 2 ** 62, ()).item())
        self._rounding_seed = as_u64(stochastic_rounding_seed or 0, "stochastic_rounding_seed")
        # updates so far: the Philox counter of the rounding draws (not in state_dict, like timm)
        self.register_buffer("_rounding_step", torch.zeros((), dtype=torch.int64), persistent=False)
        self._plan: UpdatePlan | None = None  # update()'s tensor lists, built on first use

    @staticmethod
    def task_mean_decay(task_index: int) -> float:
        """NTK-CL's adaptive EMA: after task t the average is the mean of the t + 1 end-of-task weights."""
        if isinstance(task_index, bool) or not isinstance(task_index, int) or task_index < 0:
            raise ValueError(f"task_index must be an int >= 0, got {task_index!r}")
        return task_index / (task_index + 1)

    def get_decay(self, step: int | None = None) -> float:
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            return max(min(decay, self.decay), self.min_decay)
        return self.decay

    def _plan_for(self, model: torch.nn.Module) -> UpdatePlan:
        """The cached lists of `update`, walked anew when anything they were built from changed."""
        flags = (self.exclude_buffers, self.stochastic_rounding)
        if torch.compiler.is_compiling():  # traced once; dynamo's guards on the modules see changes
            return UpdatePlan(self.module, model, *flags, keyed=False)
        plan = self.__dict__.get("_plan")  # absent from an average pickled before plans existed
        if (plan is None or plan.model is not model or plan.ema_module is not self.module
                or plan.flags != flags or not plan.fresh()):
            plan = self._plan = UpdatePlan(self.module, model, *flags)
        return plan

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None, *, decay: float | None = None) -> None:
        decay = self.get_decay(step) if decay is None else _validate.unit_interval(decay, "decay")
        model = distributed_ema.unwrap(model)
        if self._sharded is not None:
            self._sharded.update(decay, self.backend, average_buffers=not self.exclude_buffers)
            return
        plan = self._plan_for(model)
        for group in plan.groups:
            if group.staged:  # chunks copied to pinned memory on a side stream while the last is averaged
                staging = self.__dict__.get("_staging") or self.__dict__.setdefault("_staging", HostStaging())
                for ema_part, src_part in staging.chunks(group.src, group.ema):
                    ema_update_(ema_part, src_part, decay, backend=self.backend)
                continue
            ema_list = group.ema
            src_list = [s.to(group.device) for s in group.src] if group.moves else group.src
            if not group.low:
                ema_update_(ema_list, src_list, decay, backend=self.backend)
                continue
            ema_update_([ema_list[i] for i in group.rest], [src_list[i] for i in group.rest], decay,
                        backend=self.backend)
            wide = [ema_list[i].float() for i in group.low]  # the fp32 average, then one stochastic rounding
            ema_update_(wide, [src_list[i] for i in group.low], decay, backend=self.backend)
            for i, w in zip(group.low, wide):
                _stochastic_round_(ema_list[i], w, as_i64(self._rounding_seed), i, self._rounding_step)
        if self.stochastic_rounding:
            self._rounding_step.add_(1)
        for e, s in plan.copies:
            e.copy_(s.to(e.device))

    def __getstate__(self):
        """deepcopy and pickle leave the cached plan behind: it holds the live model's tensors."""
        state = self.__dict__.copy()
        state["_plan"] = None
        state.pop("_staging", None)  # pinned buffers and streams: made again on the next update
        return state

    @torch.no_grad()
    def set(self, model: torch.nn.Module) -> None:
        """Copies every value of state_dict() (parameters and persistent buffers), as timm does."""
        if self._sharded is not None:
            self._sharded.set()
            return
        ema_p, model_p, ema_b, model_b = _pairs(self.module, distributed_ema.unwrap(model), persistent_only=True)
        for e, s in zip(ema_p + ema_b, model_p + model_b):
            e.copy_(s.to(e.device))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Writes the average into `model` (plain, DDP or FSDP2): parameters and persistent buffers."""
        if self._sharded is not None:
            self._sharded.copy_to(model)
            return
        module = distributed_ema.unwrap(model)
        ema_p, _, ema_b, _ = _pairs(self.module, module, persistent_only=True)
        targets = [p for _, p in module.named_parameters()] + _buffers(module, True)
        for t, e in zip(targets, ema_p + ema_b):
            t.detach().copy_(e.to(t.device))

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module):
        """`with ema.average_parameters(model):` runs the block with the average in `model`, then
        puts the trained values back exactly (for evaluation with the EMA weights)."""
        module = distributed_ema.unwrap(model)
        targets = [p for _, p in module.named_parameters()] + _buffers(module, True)
        local = [t.to_local() if distributed.is_dtensor(t) else t for t in targets]
        saved = [t.detach().clone() for t in local]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for t, s in zip(local, saved):
                    t.copy_(s)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if self._sharded is None:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = self._sharded.state_dict(prefix + "module.")
        if destination is not None:
            destination.update(out)
            return destination
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self._sharded is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sharded.load_state_dict(state_dict, "module.")
        return torch.nn.modules.module._IncompatibleKeys([], [])

    def forward(self, *args, **kwargs):
        if self.module is None:
            raise RuntimeError("an FSDP2 model's average is kept as shards; evaluate it with "
                               "`with ema.average_parameters(model):`")
        return self.module(*args, **kwargs)
