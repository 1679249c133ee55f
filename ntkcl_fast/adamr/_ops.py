"""The two ops of an AdamR step: their Triton registrations, fake kernels, and the calls that pick a backend.

`adamr_v_hat_sum` (pass 1, reads grads and second moments, writes nothing) gives each list's share
of DAREx's V as a 0-d fp64 device tensor; `adamr_step_` (pass 2) updates moments, params and step
counts, reading V from device memory. Neither reads a value back to the host.
"""
from __future__ import annotations

import torch

from .. import _backend
from ..reference import adamr as reference

_STEP_WRITES = ("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "state_steps")


@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::adamr_step_", mutates_args=_STEP_WRITES)
def _triton_adamr_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                        exp_avg_sq: list[torch.Tensor], max_exp_avg_sq: list[torch.Tensor],
                        anchors: list[torch.Tensor], state_steps: list[torch.Tensor], v_mean: torch.Tensor | None, *,
                        lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, pull: float,
                        l1: bool) -> None:
    from ..triton.adamr import adamr_step_ as launch
    launch(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean, lr=lr, beta1=beta1,
           beta2=beta2, eps=eps, weight_decay=weight_decay, pull=pull, l1=l1)


@torch.library.custom_op(f"{_backend.TRITON_NAMESPACE}::adamr_v_hat_sum", mutates_args=())
def _triton_adamr_v_hat_sum(grads: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
                            max_exp_avg_sq: list[torch.Tensor], state_steps: list[torch.Tensor], *,
                            beta2: float) -> torch.Tensor:
    from ..triton.adamr import adamr_v_hat_sum as launch
    return launch(grads, exp_avg_sq, max_exp_avg_sq, state_steps, beta2=beta2)


def _check_lengths(ref, ref_name, named) -> None:
    for name, other in named:
        torch._check(len(other) == len(ref), lambda n=name: f"{n} must have one tensor per {ref_name}")


def _adamr_step_fake(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean, *, lr,
                     beta1, beta2, eps, weight_decay, pull, l1):
    _check_lengths(params, "params", (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                                      ("anchors", anchors), ("state_steps", state_steps)))
    torch._check(len(max_exp_avg_sq) in (0, len(params)), lambda: "max_exp_avg_sq must be empty or one per params")


def _adamr_v_hat_sum_fake(grads, exp_avg_sq, max_exp_avg_sq, state_steps, *, beta2):
    _check_lengths(grads, "grads", (("exp_avg_sq", exp_avg_sq), ("state_steps", state_steps)))
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((), dtype=torch.float64, device=device)


for _ns in (("ntkcl_fast",) if _backend._C is not None else ()) + (_backend.TRITON_NAMESPACE,):
    torch.library.register_fake(f"{_ns}::adamr_step_", _adamr_step_fake)
    torch.library.register_fake(f"{_ns}::adamr_v_hat_sum", _adamr_v_hat_sum_fake)


def v_hat_sum(backend: str, grads, exp_avg_sq, max_exp_avg_sq, state_steps, *, beta2: float) -> torch.Tensor:
    """Pass 1 on a resolved backend: 0-d fp64 sum of the bias-corrected new second moments."""
    if backend == "torch":
        return reference.adamr_v_hat_sum(grads, exp_avg_sq, max_exp_avg_sq, state_steps, beta2=beta2)
    dense = _backend.dense
    return _backend.kernel(backend, "adamr_v_hat_sum")(dense(grads), dense(exp_avg_sq), dense(max_exp_avg_sq),
                                                       state_steps, beta2=beta2)


def step_(backend: str, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean,
          **hyper) -> None:
    """Pass 2 on a resolved backend; strided params or moments are stepped through dense copies."""
    if backend == "torch":
        reference.adamr_step_(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean,
                              **hyper)
        return
    written = (params, exp_avg, exp_avg_sq, max_exp_avg_sq)
    work = [_backend.dense(lst) for lst in written]
    _backend.kernel(backend, "adamr_step_")(work[0], _backend.dense(grads), work[1], work[2], work[3],
                                            _backend.dense(anchors), state_steps, v_mean, **hyper)
    for orig, new in zip(written, work):
        _backend.write_back(orig, new)
