"""`AdamR`: Adam plus a decoupled pull toward anchor (e.g. pre-trained) weights, DAREx-L2 style.

    p <- p - lr * (weight_decay * p + pull * D(p - anchor)) - (lr / bc1) * m / (sqrt(v / bc2) + eps)

with D the identity (``pull_norm="l2"``) or sign (``"l1"``). The moments follow torch.optim.Adam.
One fused multi-tensor step per device and dtype-free: bf16 params keep fp32 moments by default.
"""
from __future__ import annotations

import math

import torch

from . import _backend, _validate
from .reference import adamr as reference


@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::adamr_step_", mutates_args=("params", "exp_avg", "exp_avg_sq"))
def _triton_adamr_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                        exp_avg_sq: list[torch.Tensor], anchors: list[torch.Tensor], hyper: list[float],
                        l1: bool) -> None:
    from .triton.adamr import adamr_step_ as launch
    launch(params, grads, exp_avg, exp_avg_sq, anchors, hyper, l1)


def _adamr_step_fake(params, grads, exp_avg, exp_avg_sq, anchors, hyper, l1):
    for name, other in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("anchors", anchors)):
        torch._check(len(other) == len(params), lambda n=name: f"{n} must have one tensor per params")
    torch._check(len(hyper) == 8, lambda: "hyper must hold 8 values")


for _ns in (("ntkcl_fast",) if _backend._C is not None else ()) + (_backend.TRITON_NAMESPACE,):
    torch.library.register_fake(f"{_ns}::adamr_step_", _adamr_step_fake)


class AdamR(torch.optim.Optimizer):
    """Adam with a decoupled L2 (or L1) pull of every parameter toward its anchor.

    `anchors`: None (a copy of each parameter when it joins the optimizer, at construction or
    in `add_param_group`: the pre-trained weights), or one tensor per parameter in the order of
    `params`. The anchor is kept in the optimizer state (key ``"anchor"``), so `state_dict()` /
    `load_state_dict()` round-trip it. The step count is a Python int (``state["step"]``): the
    bias corrections are host floats of the op's schema, so reading a device count would cost a
    sync per parameter.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, pull: float = 0.0, pull_norm: str = "l2", anchors=None, state_dtype: torch.dtype | None = None,
                 backend: str = "auto"):
        lr = _validate.finite_float(lr, "lr", nonnegative=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= _validate.finite_float(b, f"betas[{i}]") < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        eps = _validate.finite_float(eps, "eps", nonnegative=True)
        weight_decay = _validate.finite_float(weight_decay, "weight_decay", nonnegative=True)
        pull = _validate.finite_float(pull, "pull", nonnegative=True)
        if pull_norm not in ("l2", "l1"):
            raise ValueError(f"pull_norm must be 'l2' or 'l1', got {pull_norm!r}")
        if state_dtype is not None and state_dtype not in _validate.FLOATING:
            raise TypeError(f"state_dtype must be a floating dtype, got {state_dtype}")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay, pull=pull,
                        pull_norm=pull_norm)
        self.backend = backend
        self.state_dtype = state_dtype
        self._given_anchors = anchors is not None  # then add_param_group leaves the constructor's params alone
        super().__init__(params, defaults)
        self._given_anchors = False
        if anchors is not None:
            all_params = [p for g in self.param_groups for p in g["params"]]
            anchors = _validate.tensor_list(anchors, "anchors")
            _validate.same_length(all_params, "params", anchors, "anchors")
            _validate.same_shapes(all_params, "params", anchors, "anchors")
            for p, a in zip(all_params, anchors):
                self.state[p]["anchor"] = a.detach().to(p.device).clone()

    def add_param_group(self, param_group: dict) -> None:
        """torch's `add_param_group`; each new parameter is anchored at its current value."""
        super().add_param_group(param_group)
        for i, p in enumerate(self.param_groups[-1]["params"]):
            if p.dtype not in _validate.FLOATING:
                self.param_groups.pop()
                raise TypeError(f"params[{i}] has unsupported dtype {p.dtype}")
        if not self._given_anchors:
            for p in self.param_groups[-1]["params"]:
                if "anchor" not in self.state[p]:
                    self.state[p]["anchor"] = p.detach().clone()

    def load_state_dict(self, state_dict) -> None:
        """torch.optim casts loaded state to each param's dtype; AdamR keeps the saved dtypes
        (fp32 moments and anchors of bf16 params stay fp32, bit for bit). A tensor step count
        (torch's format) becomes a Python int."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if key == "step":
                    self.state[p][key] = int(value.item()) if isinstance(value, torch.Tensor) else int(value)
                elif isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(p.device, copy=True)

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
        # Every check of every group runs before the first write: a step that raises changes no
        # parameter and no state.
        plans = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise TypeError("AdamR does not support sparse gradients")
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in params:  # params with the same step count share one fused call per device
                by_key.setdefault((p.device, self.state[p].get("step", 0) + 1), []).append(p)
            plans += [(group, ps, step, _backend.resolve(self.backend, device, "adamr_step_"))
                      for (device, step), ps in by_key.items()]
        for group, params, step, name in plans:
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    dt = self._moment_dtype(p)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            self._fused_step(group, params, step, name)
            for p in params:
                self.state[p]["step"] = step
        return loss

    def _fused_step(self, group, params, step: int, name: str) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        anchors = [self.state[p]["anchor"] for p in params]
        l1 = group["pull_norm"] == "l1"
        if name == "torch":
            reference.adamr_step_(params, grads, m, v, anchors, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"], pull=group["pull"], l1=l1, step=step)
            return
        hyper = [lr, beta1, beta2, group["eps"], group["weight_decay"], group["pull"], lr / (1 - beta1 ** step),
                 1 / math.sqrt(1 - beta2 ** step)]
        work = [_backend.dense(lst) for lst in (params, m, v)]
        _backend.kernel(name, "adamr_step_")(work[0], _backend.dense(grads), work[1], work[2],
                                             _backend.dense(anchors), hyper, l1)
        for orig, new in zip((params, m, v), work):
            _backend.write_back(orig, new)
