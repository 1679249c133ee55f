// Argument checks of ntkcl_fast::adamr_step_, shared by the CPU and CUDA kernels: everything is
// checked before the first write, so a step that raises changes no parameter and no moment.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"

namespace ntkcl_fast {

inline void check_adamr_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                             at::TensorList exp_avg_sq, at::TensorList anchors, at::ArrayRef<double> hyper,
                             c10::DeviceType device) {
  TORCH_CHECK_VALUE(hyper.size() == 8, "hyper must hold 8 values, got ", hyper.size());
  check_writable(params, "params");
  check_writable(exp_avg, "exp_avg");
  check_writable(exp_avg_sq, "exp_avg_sq");
  check_same_list(params, "params", params, "params", device);
  check_same_list(params, "params", grads, "grads", device);
  check_same_list(params, "params", exp_avg, "exp_avg", device);
  check_same_list(params, "params", exp_avg_sq, "exp_avg_sq", device);
  check_same_list(params, "params", anchors, "anchors", device);
  check_same_dtype(params, "params", grads, "grads");
  check_same_dtype(exp_avg, "exp_avg", exp_avg_sq, "exp_avg_sq");
  check_one_device(params, "params");
  check_no_overlap({{params, "params"}, {exp_avg, "exp_avg"}, {exp_avg_sq, "exp_avg_sq"}},
                   {{grads, "grads"}, {anchors, "anchors"}});
}

}  // namespace ntkcl_fast
