// Argument checks of ntkcl_fast::ema_update_, shared by the CPU and CUDA kernels. They run before
// anything is written and name the offending argument and index; the Python API leaves the
// per-tensor checks of contiguous lists to them (a Python loop over a model costs more than
// the GPU kernel).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <vector>

#include "overlap.h"

namespace ntkcl_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_ema_args(at::TensorList ema, at::TensorList src, at::ArrayRef<double> decay,
                           const std::optional<at::Tensor>& decay_tensor, c10::DeviceType device) {
  TORCH_CHECK_VALUE(ema.size() == src.size(), "ema and src must have the same length, got ",
                    ema.size(), " and ", src.size());
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
  TORCH_CHECK_VALUE(has_tensor || decay.size() == ema.size(),
                    "decay must have one value per pair (", ema.size(), "), got ", decay.size());
  if (has_tensor) {
    TORCH_CHECK_VALUE(decay_tensor->dim() == 0, "decay_tensor must be 0-d");
    TORCH_CHECK_TYPE(is_supported_float(decay_tensor->scalar_type()), "decay_tensor must be floating");
    TORCH_CHECK_VALUE(decay_tensor->device().type() == device, "decay_tensor is on the wrong device");
  }
  for (size_t i = 0; i < ema.size(); ++i) {
    TORCH_CHECK_VALUE(ema[i].sizes() == src[i].sizes(), "ema[", i, "] and src[", i, "] differ in shape: ",
                      ema[i].sizes(), " and ", src[i].sizes());
    TORCH_CHECK_TYPE(!ema[i].is_complex() && !src[i].is_complex(), "ema[", i, "]/src[", i,
                     "] are complex, which EMA does not support");
    TORCH_CHECK_TYPE(ema[i].is_floating_point() == src[i].is_floating_point(), "ema[", i, "] (",
                     ema[i].scalar_type(), ") and src[", i, "] (", src[i].scalar_type(),
                     ") must both be floating or both not");
    if (ema[i].is_floating_point()) {
      TORCH_CHECK_TYPE(is_supported_float(ema[i].scalar_type()), "ema[", i, "] must be fp16/bf16/fp32/fp64");
      TORCH_CHECK_TYPE(is_supported_float(src[i].scalar_type()), "src[", i, "] must be fp16/bf16/fp32/fp64");
    }
    TORCH_CHECK_VALUE(ema[i].device().type() == device && src[i].device() == ema[i].device(),
                      "ema[", i, "] and src[", i, "] must be on one ", c10::DeviceTypeName(device), " device");
    TORCH_CHECK_VALUE(ema[i].is_contiguous() && src[i].is_contiguous(),
                      "ema[", i, "] and src[", i, "] must be contiguous");
    if (!has_tensor) {
      TORCH_CHECK_VALUE(decay[i] >= 0.0 && decay[i] <= 1.0, "decay[", i, "] must be in [0, 1]");
    }
  }
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
