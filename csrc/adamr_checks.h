// Argument checks of ntkcl_fast::adamr_step_ and ntkcl_fast::adamr_v_hat_sum, shared by the CPU
// and CUDA kernels: everything is checked before the first write, so a step that raises changes
// no parameter, no moment and no step count.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "checks.h"

namespace ntkcl_fast {

struct AdamRHyper {
  double lr, beta1, beta2, eps, weight_decay, pull;
  bool l1;
};

// One 0-d fp32 step count per tensor of `ref`, on its partner's device (torch.optim's format).
inline void check_state_steps(at::TensorList ref, const char* ref_name, at::TensorList steps) {
  check_length(ref, ref_name, steps.size(), "state_steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    const Arg arg = at_index("state_steps", i);
    TORCH_CHECK_VALUE(steps[i].dim() == 0, arg, " must be 0-d");
    TORCH_CHECK_TYPE(steps[i].scalar_type() == at::kFloat, arg, " must be fp32");
    TORCH_CHECK_VALUE(steps[i].device() == ref[i].device(), arg, " must be on the device of ", at_index(ref_name, i));
  }
}

// max_exp_avg_sq is empty (no AMSGrad) or pairs with exp_avg_sq, in its dtype.
inline void check_max_exp_avg_sq(at::TensorList ref, at::TensorList exp_avg_sq, at::TensorList max_exp_avg_sq,
                                 c10::DeviceType device) {
  if (max_exp_avg_sq.empty()) return;
  check_same_list(ref, "params", max_exp_avg_sq, "max_exp_avg_sq", device);
  check_same_dtype(exp_avg_sq, "exp_avg_sq", max_exp_avg_sq, "max_exp_avg_sq");
}

inline void check_beta(double beta, const char* name) {
  TORCH_CHECK_VALUE(beta >= 0.0 && beta < 1.0, name, " must be in [0, 1), got ", beta);
}

inline void check_adamr_v_hat_sum_args(at::TensorList grads, at::TensorList exp_avg_sq, at::TensorList max_exp_avg_sq,
                                       at::TensorList state_steps, double beta2, c10::DeviceType device) {
  check_beta(beta2, "beta2");
  check_same_list(grads, "grads", grads, "grads", device);
  check_same_list(grads, "grads", exp_avg_sq, "exp_avg_sq", device);
  check_max_exp_avg_sq(grads, exp_avg_sq, max_exp_avg_sq, device);
  check_state_steps(grads, "grads", state_steps);
  check_one_device(grads, "grads");
}

inline void check_adamr_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                                  at::TensorList exp_avg_sq, at::TensorList max_exp_avg_sq, at::TensorList anchors,
                                  at::TensorList state_steps, const std::optional<at::Tensor>& v_mean,
                                  const AdamRHyper& h, c10::DeviceType device) {
  TORCH_CHECK_VALUE(std::isfinite(h.lr) && h.lr >= 0, "lr must be finite and >= 0, got ", h.lr);
  check_beta(h.beta1, "beta1");
  check_beta(h.beta2, "beta2");
  TORCH_CHECK_VALUE(std::isfinite(h.eps) && h.eps >= 0, "eps must be finite and >= 0, got ", h.eps);
  TORCH_CHECK_VALUE(std::isfinite(h.weight_decay), "weight_decay must be finite, got ", h.weight_decay);
  TORCH_CHECK_VALUE(std::isfinite(h.pull), "pull must be finite, got ", h.pull);
  check_writable(params, "params");
  check_writable(exp_avg, "exp_avg");
  check_writable(exp_avg_sq, "exp_avg_sq");
  check_writable(max_exp_avg_sq, "max_exp_avg_sq");
  check_same_list(params, "params", params, "params", device);
  check_same_list(params, "params", grads, "grads", device);
  check_same_list(params, "params", exp_avg, "exp_avg", device);
  check_same_list(params, "params", exp_avg_sq, "exp_avg_sq", device);
  check_same_list(params, "params", anchors, "anchors", device);
  check_max_exp_avg_sq(params, exp_avg_sq, max_exp_avg_sq, device);
  check_state_steps(params, "params", state_steps);
  check_same_dtype(params, "params", grads, "grads");
  check_same_dtype(exp_avg, "exp_avg", exp_avg_sq, "exp_avg_sq");
  check_one_device(params, "params");
  if (v_mean.has_value() && v_mean->defined() && !params.empty()) {
    check_device_scalar(*v_mean, "v_mean", params[0].device());
  }
  check_no_overlap({{params, "params"}, {exp_avg, "exp_avg"}, {exp_avg_sq, "exp_avg_sq"},
                    {max_exp_avg_sq, "max_exp_avg_sq"}, {state_steps, "state_steps"}},
                   {{grads, "grads"}, {anchors, "anchors"}});
}

}  // namespace ntkcl_fast
