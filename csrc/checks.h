// Argument checks every multi-tensor op family shares; the per-family headers (ema_checks.h,
// dare_checks.h, penalty_checks.h, adamr_checks.h) compose them. They run before anything is
// written and raise ValueError (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) naming the
// argument and list index, as the Python API does.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <ostream>

#include "overlap.h"

namespace ntkcl_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// An argument name in messages: `name`, or `name[index]` for a list element.
struct Arg {
  const char* name;
  int64_t index = -1;
};

inline std::ostream& operator<<(std::ostream& os, const Arg& a) {
  os << a.name;
  if (a.index >= 0) os << '[' << a.index << ']';
  return os;
}

inline Arg at_index(const char* name, size_t i) { return {name, static_cast<int64_t>(i)}; }

inline void check_float(const at::Tensor& t, const Arg& arg) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), arg, " must be fp16/bf16/fp32/fp64");
}

// A tensor written in place: one memory location per element (no stride-0, expanded, dimension).
inline void check_writable(const at::Tensor& t, const Arg& arg) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK_VALUE(t.stride(d) != 0 || t.size(d) <= 1, arg, " has a stride-0 (expanded) dimension, shape ",
                      t.sizes(), " strides ", t.strides(), "; in-place outputs need one memory location per element");
  }
}

inline void check_writable(at::TensorList list, const char* name) {
  for (size_t i = 0; i < list.size(); ++i) check_writable(list[i], at_index(name, i));
}

inline void check_length(at::TensorList ref, const char* ref_name, size_t size, const char* name) {
  TORCH_CHECK_VALUE(size == ref.size(), name, " must have one tensor per ", ref_name, " (", ref.size(), "), got ",
                    size);
}

// `other` pairs with `ref` element by element: same length and shapes, floating, contiguous, each
// on its partner's device of type `device`.
inline void check_same_list(at::TensorList ref, const char* ref_name, at::TensorList other, const char* name,
                            c10::DeviceType device) {
  check_length(ref, ref_name, other.size(), name);
  for (size_t i = 0; i < ref.size(); ++i) {
    const Arg arg = at_index(name, i);
    TORCH_CHECK_VALUE(other[i].sizes() == ref[i].sizes(), arg, " and ", at_index(ref_name, i), " differ in shape");
    check_float(other[i], arg);
    TORCH_CHECK_VALUE(other[i].device().type() == device && other[i].device() == ref[i].device(), arg,
                      " must be on the device of ", at_index(ref_name, i));
    TORCH_CHECK_VALUE(other[i].is_contiguous(), arg, " must be contiguous");
  }
}

inline void check_same_dtype(at::TensorList ref, const char* ref_name, at::TensorList other, const char* name) {
  for (size_t i = 0; i < ref.size(); ++i) {
    TORCH_CHECK_TYPE(other[i].scalar_type() == ref[i].scalar_type(), at_index(name, i), " must have the dtype of ",
                     at_index(ref_name, i));
  }
}

// Every tensor of `list` on the device of its first: one launch per device.
inline void check_one_device(at::TensorList list, const char* name) {
  for (size_t i = 1; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].device() == list[0].device(), at_index(name, i), " is on ", list[i].device(), ", ",
                      at_index(name, 0), " on ", list[0].device(), ": one call takes tensors of one device");
  }
}

// A 0-d floating scalar argument on `device` (decay_tensor, grad_output).
inline void check_device_scalar(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 0, name, " must be 0-d");
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name, " must be floating");
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device);
}

}  // namespace ntkcl_fast
