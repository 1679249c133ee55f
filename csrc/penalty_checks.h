// Argument checks of the L2 / EWC ops, shared by the CPU and CUDA kernels. The Python API checks
// the same things first with the user's argument names; these guard direct torch.ops callers.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "ema_checks.h"

namespace ntkcl_fast {

inline void check_same_list(at::TensorList ref, const char* ref_name, at::TensorList other,
                            const char* name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(other.size() == ref.size(), name, " must have one tensor per ", ref_name, " (",
                    ref.size(), "), got ", other.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK_VALUE(other[i].sizes() == ref[i].sizes(), name, "[", i, "] and ", ref_name, "[", i,
                      "] differ in shape");
    TORCH_CHECK_TYPE(is_supported_float(other[i].scalar_type()), name, "[", i, "] must be fp16/bf16/fp32/fp64");
    TORCH_CHECK_VALUE(other[i].device().type() == device && other[i].device() == ref[i].device(), name, "[",
                      i, "] must be on the device of ", ref_name, "[", i, "]");
    TORCH_CHECK_VALUE(other[i].is_contiguous(), name, "[", i, "] must be contiguous");
  }
}

inline void check_l2_args(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                          at::TensorList importance, double scale, const std::optional<at::Tensor>& grad_output,
                          c10::DeviceType device) {
  check_same_list(params, "params", params, "params", device);
  check_same_list(params, "params", anchors, "anchors", device);
  if (!importance.empty()) check_same_list(params, "params", importance, "importance", device);
  if (!grads.empty()) {
    check_same_list(params, "params", grads, "grads", device);
    for (size_t i = 0; i < grads.size(); ++i) {
      TORCH_CHECK_TYPE(grads[i].scalar_type() == params[i].scalar_type(), "grads[", i,
                       "] must have the dtype of params[", i, "]");
    }
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite");
  for (size_t i = 1; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), "params[", i, "] is on ", params[i].device(),
                      ", params[0] on ", params[0].device(), ": one call takes tensors of one device");
  }
  if (grad_output.has_value() && grad_output->defined()) {
    TORCH_CHECK_VALUE(grad_output->dim() == 0, "grad_output must be 0-d");
    TORCH_CHECK_TYPE(is_supported_float(grad_output->scalar_type()), "grad_output must be floating");
    TORCH_CHECK_VALUE(params.empty() || grad_output->device() == params[0].device(),
                      "grad_output must be on the params' device");
  }
}

inline void check_fisher_args(at::TensorList fisher, at::TensorList grads, double scale, double decay,
                              c10::DeviceType device) {
  check_same_list(fisher, "fisher", fisher, "fisher", device);
  check_same_list(fisher, "fisher", grads, "grads", device);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(decay), "scale and decay must be finite");
  for (size_t i = 1; i < fisher.size(); ++i) {
    TORCH_CHECK_VALUE(fisher[i].device() == fisher[0].device(), "fisher[", i, "] is on ", fisher[i].device(),
                      ", fisher[0] on ", fisher[0].device(), ": one call takes tensors of one device");
  }
}

}  // namespace ntkcl_fast
