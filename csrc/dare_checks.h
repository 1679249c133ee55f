// Argument checks of the ntkcl_fast::dare ops, shared by the CPU and CUDA kernels. The Python API
// checks the same things first with the user's argument names; these guard direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "ema_checks.h"

namespace ntkcl_fast {

inline void check_dare_one(const at::Tensor& out, const at::Tensor& finetuned, const at::Tensor* base,
                           int64_t threshold, double q, const std::optional<at::Tensor>& q_rows,
                           c10::DeviceType device, const char* what = "") {
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= (int64_t{1} << 32), what, "threshold must be in [0, 2^32]");
  TORCH_CHECK_TYPE(is_supported_float(out.scalar_type()), what, "out must be fp16/bf16/fp32/fp64");
  TORCH_CHECK_TYPE(finetuned.scalar_type() == out.scalar_type(), what, "finetuned and out must have one dtype");
  TORCH_CHECK_VALUE(finetuned.sizes() == out.sizes(), what, "finetuned and out must have one shape");
  TORCH_CHECK_VALUE(out.device().type() == device && finetuned.device() == out.device(), what,
                    "out and finetuned must be on one ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK_VALUE(out.is_contiguous() && finetuned.is_contiguous(), what, "out and finetuned must be contiguous");
  if (base != nullptr) {
    TORCH_CHECK_TYPE(base->scalar_type() == out.scalar_type(), what, "base and out must have one dtype");
    TORCH_CHECK_VALUE(base->sizes() == out.sizes(), what, "base and out must have one shape");
    TORCH_CHECK_VALUE(base->device() == out.device(), what, "base must be on out's device");
    TORCH_CHECK_VALUE(base->is_contiguous(), what, "base must be contiguous");
  }
  const bool rows = q_rows.has_value() && q_rows->defined();
  if (rows) {
    const auto acc = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(out.dim() >= 1 && q_rows->dim() == 1 && q_rows->size(0) == out.size(0), what,
                      "q_rows must be 1-D with one value per row of out");
    TORCH_CHECK_TYPE(q_rows->scalar_type() == acc, what, "q_rows must be ", acc, " for ", out.scalar_type(), " out");
    TORCH_CHECK_VALUE(q_rows->device() == out.device() && q_rows->is_contiguous(), what,
                      "q_rows must be contiguous on out's device");
  } else {
    TORCH_CHECK_VALUE(q > 0.0, what, "q must be > 0");
  }
}

}  // namespace ntkcl_fast
