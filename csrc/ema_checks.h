// Argument checks of ntkcl_fast::ema_update_, shared by the CPU and CUDA kernels. They run before
// anything is written and name the offending argument and index; the Python API leaves the
// per-tensor checks of contiguous lists to them (a Python loop over a model costs more than
// the GPU kernel).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <vector>

#include "checks.h"

namespace ntkcl_fast {

inline void check_ema_args(at::TensorList ema, at::TensorList src, at::ArrayRef<double> decay,
                           const std::optional<at::Tensor>& decay_tensor, c10::DeviceType device) {
  TORCH_CHECK_VALUE(ema.size() == src.size(), "ema and src must have the same length, got ",
                    ema.size(), " and ", src.size());
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
  TORCH_CHECK_VALUE(has_tensor || decay.size() == ema.size(),
                    "decay must have one value per pair (", ema.size(), "), got ", decay.size());
  if (has_tensor) {
    TORCH_CHECK_VALUE(decay_tensor->device().type() == device, "decay_tensor is on the wrong device");
    check_device_scalar(*decay_tensor, "decay_tensor", ema.empty() ? decay_tensor->device() : ema[0].device());
  }
  check_writable(ema, "ema");
  for (size_t i = 0; i < ema.size(); ++i) {
    const Arg e = at_index("ema", i), s = at_index("src", i);
    TORCH_CHECK_VALUE(ema[i].sizes() == src[i].sizes(), e, " and ", s, " differ in shape: ", ema[i].sizes(), " and ",
                      src[i].sizes());
    TORCH_CHECK_TYPE(!ema[i].is_complex() && !src[i].is_complex(), e, "/", s, " are complex, which EMA does not support");
    TORCH_CHECK_TYPE(ema[i].is_floating_point() == src[i].is_floating_point(), e, " (", ema[i].scalar_type(), ") and ",
                     s, " (", src[i].scalar_type(), ") must both be floating or both not");
    if (ema[i].is_floating_point()) {
      check_float(ema[i], e);
      check_float(src[i], s);
    }
    TORCH_CHECK_VALUE(ema[i].device().type() == device && src[i].device() == ema[i].device(), e, " and ", s,
                      " must be on one ", c10::DeviceTypeName(device), " device");
    TORCH_CHECK_VALUE(ema[i].is_contiguous() && src[i].is_contiguous(), e, " and ", s, " must be contiguous");
    if (!has_tensor) {
      TORCH_CHECK_VALUE(decay[i] >= 0.0 && decay[i] <= 1.0, "decay[", i, "] must be in [0, 1]");
    }
  }
  check_one_device(ema, "ema");
  check_no_overlap(ema, "ema", src, "src");
}

// The floating pairs (with their decays) go to the kernel; the others are copied, as buffers
// such as BatchNorm's num_batches_tracked are.
struct EmaWork {
  std::vector<at::Tensor> ema, src;
  std::vector<double> decay;
};

inline EmaWork split_ema_pairs(at::TensorList ema, at::TensorList src, at::ArrayRef<double> decay) {
  EmaWork work;
  for (size_t i = 0; i < ema.size(); ++i) {
    if (!ema[i].is_floating_point()) {
      ema[i].copy_(src[i]);
      continue;
    }
    work.ema.push_back(ema[i]);
    work.src.push_back(src[i]);
    if (!decay.empty()) work.decay.push_back(decay[i]);
  }
  return work;
}

}  // namespace ntkcl_fast
