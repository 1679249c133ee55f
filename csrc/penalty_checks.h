// Argument checks of the L2 / EWC ops, shared by the CPU and CUDA kernels. The Python API checks
// the same things first with the user's argument names; these guard direct torch.ops callers.
#pragma once
#include <ATen/ATen.h>
#include <cmath>
#include <optional>

#include "checks.h"

namespace ntkcl_fast {

inline void check_l2_args(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                          at::TensorList importance, double scale, const std::optional<at::Tensor>& grad_output,
                          c10::DeviceType device) {
  check_same_list(params, "params", params, "params", device);
  check_same_list(params, "params", anchors, "anchors", device);
  if (!importance.empty()) check_same_list(params, "params", importance, "importance", device);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite");
  check_one_device(params, "params");
  if (grad_output.has_value() && grad_output->defined()) {
    TORCH_CHECK_VALUE(params.empty() || grad_output->device() == params[0].device(),
                      "grad_output must be on the params' device");
    check_device_scalar(*grad_output, "grad_output", grad_output->device());
  }
}

// l2_penalty_grad_: the value's checks plus the written gradients, one per params and of its dtype.
// grads may repeat a tensor (a parameter listed twice gets its gradient added twice).
inline void check_l2_grad_args(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                               at::TensorList importance, double scale, const std::optional<at::Tensor>& grad_output,
                               c10::DeviceType device) {
  check_l2_args(grads, params, anchors, importance, scale, grad_output, device);
  check_writable(grads, "grads");
  check_same_list(params, "params", grads, "grads", device);
  check_same_dtype(params, "params", grads, "grads");
}

inline void check_fisher_args(at::TensorList fisher, at::TensorList grads, double scale, double decay,
                              c10::DeviceType device) {
  check_writable(fisher, "fisher");
  check_same_list(fisher, "fisher", fisher, "fisher", device);
  check_same_list(fisher, "fisher", grads, "grads", device);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(decay), "scale and decay must be finite");
  check_one_device(fisher, "fisher");
  check_no_overlap(fisher, "fisher", grads, "grads");
}

}  // namespace ntkcl_fast
