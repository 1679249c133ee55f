// Argument checks of the ntkcl_fast::dare ops, shared by the CPU and CUDA kernels. The Python API
// checks the same things first with the user's argument names; these guard direct torch.ops calls.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "checks.h"

namespace ntkcl_fast {

// One (out, finetuned, base) triple; `index` is its list position in dare_multi_ (-1 for dare_).
inline void check_dare_one(const at::Tensor& out, const at::Tensor& finetuned, const at::Tensor* base, double q,
                           const std::optional<at::Tensor>& q_rows, c10::DeviceType device, int64_t index = -1) {
  const Arg o{"out", index}, f{"finetuned", index}, b{"base", index};
  check_float(out, o);
  check_writable(out, o);
  TORCH_CHECK_TYPE(finetuned.scalar_type() == out.scalar_type(), f, " and ", o, " must have one dtype");
  TORCH_CHECK_VALUE(finetuned.sizes() == out.sizes(), f, " and ", o, " must have one shape");
  TORCH_CHECK_VALUE(out.device().type() == device && finetuned.device() == out.device(), o, " and ", f,
                    " must be on one ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK_VALUE(out.is_contiguous() && finetuned.is_contiguous(), o, " and ", f, " must be contiguous");
  if (base != nullptr) {
    TORCH_CHECK_TYPE(base->scalar_type() == out.scalar_type(), b, " and ", o, " must have one dtype");
    TORCH_CHECK_VALUE(base->sizes() == out.sizes(), b, " and ", o, " must have one shape");
    TORCH_CHECK_VALUE(base->device() == out.device(), b, " must be on the device of ", o);
    TORCH_CHECK_VALUE(base->is_contiguous(), b, " must be contiguous");
  }
  if (q_rows.has_value() && q_rows->defined()) {
    const auto acc = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(out.dim() >= 1 && q_rows->dim() == 1 && q_rows->size(0) == out.size(0),
                      "q_rows must be 1-D with one value per row of out");
    TORCH_CHECK_TYPE(q_rows->scalar_type() == acc, "q_rows must be ", acc, " for ", out.scalar_type(), " out");
    TORCH_CHECK_VALUE(q_rows->device() == out.device() && q_rows->is_contiguous(),
                      "q_rows must be contiguous on out's device");
  } else {
    TORCH_CHECK_VALUE(q > 0.0, Arg{"q", index}, " must be > 0");
  }
}

inline void check_threshold(int64_t threshold) {
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= (int64_t{1} << 32), "threshold must be in [0, 2^32]");
}

inline void check_dare_multi_args(at::TensorList out, at::TensorList finetuned, at::TensorList base,
                                  int64_t threshold, at::ArrayRef<double> q, at::ArrayRef<int64_t> keys,
                                  c10::DeviceType device) {
  check_length(out, "out", finetuned.size(), "finetuned");
  check_length(out, "out", base.size(), "base");
  TORCH_CHECK_VALUE(q.size() == out.size() && keys.size() == out.size(), "q and keys must have one value per out (",
                    out.size(), "), got ", q.size(), " and ", keys.size());
  check_threshold(threshold);
  for (size_t i = 0; i < out.size(); ++i) {
    check_dare_one(out[i], finetuned[i], &base[i], q[i], std::nullopt, device, static_cast<int64_t>(i));
  }
  check_one_device(out, "out");
}

}  // namespace ntkcl_fast
