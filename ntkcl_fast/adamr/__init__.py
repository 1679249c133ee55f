"""`AdamR`: Adam plus a decoupled pull toward anchor (e.g. pre-trained) weights: DAREx's AdamR.

    p <- p - lr * weight_decay * p - pull * lr / sqrt(V) * D(p - anchor) - (lr / bc1) * m / (sqrt(v / bc2) + eps)

with D the identity (``pull_norm="l2"``) or sign (``"l1"``), the decoupled terms computed from p
before the step, and V the mean over every element of every parameter that takes the step (all
groups together, as DAREx's code does) of v / bc2 (of its running max with ``amsgrad``), 1 in place
of sqrt(V) where V == 0. ``pull_scale="lr"`` drops the 1 / sqrt(V). The moments follow
torch.optim.Adam; bf16 params keep fp32 moments by default.

A step is at most two fused multi-tensor passes per device and group (ops in `_ops`): the sum of
V's numerator, only when a group needs V, then the update, which reads V and the step counts
from device memory. Step counts are 0-d fp32 tensors on each parameter's device (torch.optim's
fused / capturable format), so `torch.compile(opt.step)` builds one graph for every step.
DTensor parameters (FSDP2) step their local shards, V summed globally with one all-reduce per
step (`_dtensor`).
"""
from __future__ import annotations

import torch

from .. import _backend, _validate
from . import _dtensor, _ops

PULL_SCALES = ("stable", "lr")


class AdamR(torch.optim.Optimizer):
    """Adam with a decoupled L2 (or L1) pull of every parameter toward its anchor.

    `anchors`: None (a copy of each parameter when it joins the optimizer, at construction or in
    `add_param_group`: the pre-trained weights), or one tensor per parameter in the order of
    `params`. The anchor is kept in the optimizer state (key ``"anchor"``), so `state_dict()` /
    `load_state_dict()` round-trip it. State is created when a parameter joins, not at its first
    step, so a compiled step sees the same state layout every time; a parameter that has not
    stepped yet has ``state["step"] == 0``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, pull: float = 0.0, pull_norm: str = "l2", pull_scale: str = "stable", amsgrad: bool = False,
                 anchors=None, state_dtype: torch.dtype | None = None, backend: str = "auto"):
        if state_dtype is not None and state_dtype not in _validate.FLOATING:
            raise TypeError(f"state_dtype must be a floating dtype, got {state_dtype}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, pull=pull, pull_norm=pull_norm,
                        pull_scale=pull_scale, amsgrad=amsgrad)
        _check_hyper(defaults, "")
        defaults["betas"] = tuple(float(b) for b in betas)
        self.backend = backend
        self.state_dtype = state_dtype
        self._anchors = None
        if anchors is not None:
            self._anchors = _validate.tensor_list(anchors, "anchors")
        super().__init__(params, defaults)
        if self._anchors is not None:
            all_params = [p for g in self.param_groups for p in g["params"]]
            _validate.same_length(all_params, "params", self._anchors, "anchors")
            _validate.same_shapes(all_params, "params", self._anchors, "anchors")
            for p, a in zip(all_params, self._anchors):
                self.state[p]["anchor"] = a.detach().to(p.device).clone()
            self._anchors = None

    def add_param_group(self, param_group: dict) -> None:
        """torch's `add_param_group`; each new parameter gets its state, anchored at its current value
        (or at the constructor's `anchors`)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyper(group, f"param_groups[{len(self.param_groups) - 1}].")
            for i, p in enumerate(group["params"]):
                if p.dtype not in _validate.FLOATING:
                    raise TypeError(f"params[{i}] has unsupported dtype {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._init_state(p, group, anchor=self._anchors is None)

    def _init_state(self, p: torch.Tensor, group: dict, *, anchor: bool = True) -> None:
        state = self.state[p]
        dt = self._moment_dtype(p)
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if key not in state:  # a DTensor param gets DTensor moments with its placements
                state[key] = torch.zeros_like(p, dtype=dt, memory_format=torch.contiguous_format)
        if anchor and "anchor" not in state:
            state["anchor"] = p.detach().clone()

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("pull_scale", "stable")

    def load_state_dict(self, state_dict) -> None:
        """torch.optim casts loaded state to each param's dtype; AdamR keeps the saved dtypes (fp32
        moments and anchors of bf16 params stay fp32, bit for bit). A step count saved as an int or
        as a tensor on any device becomes a 0-d fp32 tensor on the parameter's device."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("pull_scale", "stable")
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if key == "step":
                    count = value.item() if isinstance(value, torch.Tensor) else value
                    self.state[p][key] = torch.tensor(float(count), dtype=torch.float32, device=p.device)
                elif isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(p.device, copy=True)
            self._init_state(p, group)

    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans, labels, stateless = self._plan()  # every check of every group runs before the first write
        for p, group in stateless:  # a parameter put into a group after it joined, or amsgrad switched on
            self._init_state(p, group)
        sharded = _dtensor.check_kinds([p for _, ps, _ in plans for p in ps], labels)
        calls, start = [], 0
        for group, params, _ in plans:
            lists = self._step_lists(group, params)
            if sharded:  # local shards: the update is elementwise
                lists = _dtensor.local_lists(lists, labels[start:start + len(params)])
            calls.append(lists)
            start += len(params)
        v_mean = None
        if any(_needs_v(group) for group, _, _ in plans):
            v_mean = _dtensor.v_mean(plans, calls, labels) if sharded else self._v_mean(plans, calls)
        for (group, params, name), lists in zip(plans, calls):
            _ops.step_(name, *lists, v_mean.to(params[0].device) if _needs_v(group) else None, lr=group["lr"],
                       beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                       weight_decay=group["weight_decay"], pull=group["pull"], l1=group["pull_norm"] == "l1")
        return loss

    def _step_lists(self, group: dict, params: list) -> tuple:
        """The tensor lists of one fused call, in `_ops.step_`'s order."""
        state = [self.state[p] for p in params]
        return (params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                [s["max_exp_avg_sq"] for s in state] if group["amsgrad"] else [], [s["anchor"] for s in state],
                [s["step"] for s in state])

    def _plan(self):
        """[(group, params with a gradient on one device, backend)] per fused call, a label per
        planned param (in plan order), and the [(param, group)] whose state is incomplete; raises
        before anything is written."""
        plans, labels, stateless = [], [], []
        for g_index, group in enumerate(self.param_groups):
            by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError(f"param_groups[{g_index}].params[{i}]: AdamR does not support sparse gradients")
                if grad.dtype != p.dtype:  # torch itself lets one through only when p.grad_dtype is None
                    raise ValueError(f"param_groups[{g_index}].params[{i}]: grad must have the param's dtype "
                                     f"{p.dtype}, got {grad.dtype}")
                by_device.setdefault(p.device, []).append((i, p))
                state = self.state.get(p)
                if state is None or "step" not in state or group["amsgrad"] and "max_exp_avg_sq" not in state:
                    stateless.append((p, group))
            for device, items in by_device.items():
                plans.append((group, [p for _, p in items], _backend.resolve(self.backend, device, "adamr_step_")))
                labels += [f"param_groups[{g_index}].params[{i}]" for i, _ in items]
        return plans, labels, stateless

    def _v_mean(self, plans, calls) -> torch.Tensor:
        """DAREx's V: one sum per fused call (a device tensor), added and divided by the element count."""
        sums, count = [], 0
        for (group, params, name), (_, grads, _, exp_avg_sq, max_exp_avg_sq, _, steps) in zip(plans, calls):
            sums.append(_ops.v_hat_sum(name, grads, exp_avg_sq, max_exp_avg_sq, steps, beta2=group["betas"][1]))
            count += sum(p.numel() for p in params)
        device = plans[0][1][0].device
        total = sums[0]
        for s in sums[1:]:
            total = total + s.to(device)
        return total / max(count, 1)  # no elements: V = 0, read as 1


def _needs_v(group: dict) -> bool:
    return group["pull_scale"] == "stable" and group["pull"] != 0


def _check_hyper(group: dict, where: str) -> None:
    """ValueError / TypeError naming the hyperparameter (of the group, for add_param_group)."""
    _validate.finite_float(group["lr"], f"{where}lr", nonnegative=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"{where}betas must be a pair of floats, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= _validate.finite_float(b, f"{where}betas[{i}]") < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {b}")
    for key in ("eps", "weight_decay", "pull"):
        _validate.finite_float(group[key], f"{where}{key}", nonnegative=True)
    if group["pull_norm"] not in ("l2", "l1"):
        raise ValueError(f"{where}pull_norm must be 'l2' or 'l1', got {group['pull_norm']!r}")
    if group["pull_scale"] not in PULL_SCALES:
        raise ValueError(f"{where}pull_scale must be one of {PULL_SCALES}, got {group['pull_scale']!r}")
    if not isinstance(group["amsgrad"], bool):
        raise TypeError(f"{where}amsgrad must be a bool, got {group['amsgrad']!r}")
