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

if _backend._C is not None:
    @torch.library.register_fake("ntkcl_fast::adamr_step_")
    def _adamr_step_fake(params, grads, exp_avg, exp_avg_sq, anchors, hyper, l1):
        return None


class AdamR(torch.optim.Optimizer):
    """Adam with a decoupled L2 (or L1) pull of every parameter toward its anchor.

    `anchors`: None (a copy of each parameter at construction: the pre-trained weights), or
    one tensor per parameter in the order of `params`. The anchor is kept in the optimizer
    state (key ``"anchor"``), so `state_dict()` / `load_state_dict()` round-trip it.
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
        super().__init__(params, defaults)
        self.backend = backend
        self.state_dtype = state_dtype
        all_params = [p for g in self.param_groups for p in g["params"]]
        if anchors is not None:
            anchors = _validate.tensor_list(anchors, "anchors")
            _validate.same_length(all_params, "params", anchors, "anchors")
            _validate.same_shapes(all_params, "params", anchors, "anchors")
        for i, p in enumerate(all_params):
            if p.dtype not in _validate.FLOATING:
                raise TypeError(f"params[{i}] has unsupported dtype {p.dtype}")
            src = anchors[i] if anchors is not None else p
            self.state[p]["anchor"] = src.detach().to(p.device).clone()

    def load_state_dict(self, state_dict) -> None:
        """torch.optim casts loaded state to each param's dtype; AdamR keeps the saved dtypes
        (fp32 moments and anchors of bf16 params stay fp32, bit for bit)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
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
        for group in self.param_groups:
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("AdamR does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    dt = self._moment_dtype(p)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                state["step"] += 1
                # params with the same step count share one fused call per device
                by_key.setdefault((p.device, int(state["step"].item())), []).append(p)
            for (device, step), params in by_key.items():
                self._fused_step(group, params, step, device)
        return loss

    def _fused_step(self, group, params, step: int, device: torch.device) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        bc1 = 1 - beta1 ** step
        bc2 = 1 - beta2 ** step
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        anchors = [self.state[p]["anchor"] for p in params]
        l1 = group["pull_norm"] == "l1"
        name = _backend.resolve(self.backend, device, "adamr_step_")
        if name == "torch":
            reference.adamr_step_(params, grads, m, v, anchors, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"], pull=group["pull"], l1=l1, step=step)
            return
        hyper = [lr, beta1, beta2, group["eps"], group["weight_decay"], group["pull"], lr / bc1,
                 1 / math.sqrt(bc2)]
        work = [_backend.dense(lst) for lst in (params, m, v)]
        src = [_backend.dense(lst) for lst in (grads, anchors)]
        if name == "triton":
            from .triton.adamr import adamr_step_ as triton_step
            triton_step(work[0], src[0], work[1], work[2], src[1], hyper, l1)
        else:
            torch.ops.ntkcl_fast.adamr_step_(work[0], src[0], work[1], work[2], src[1], hyper, l1)
        for orig, new in zip((params, m, v), work):
            _backend.write_back(orig, new)
