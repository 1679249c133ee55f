// Tile load/store between any supported tensor dtype and a math-type buffer, shared by the CPU
// multi-tensor kernels that work on fixed tiles (penalty, AdamR).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace ntkcl_fast {

template <typename Acc>
inline void load_tile(const at::Tensor& t, int64_t off, int64_t n, Acc* out) {
  switch (t.scalar_type()) {
    case at::kFloat: return at::vec::convert(t.const_data_ptr<float>() + off, out, n);
    case at::kDouble: return at::vec::convert(t.const_data_ptr<double>() + off, out, n);
    case at::kHalf: return at::vec::convert(t.const_data_ptr<at::Half>() + off, out, n);
    case at::kBFloat16: return at::vec::convert(t.const_data_ptr<at::BFloat16>() + off, out, n);
    default: TORCH_CHECK(false, "unreachable: dtype checked before");
  }
}

template <typename Acc>
inline void store_tile(const at::Tensor& t, int64_t off, int64_t n, const Acc* in) {
  switch (t.scalar_type()) {
    case at::kFloat: return at::vec::convert(in, t.data_ptr<float>() + off, n);
    case at::kDouble: return at::vec::convert(in, t.data_ptr<double>() + off, n);
    case at::kHalf: return at::vec::convert(in, t.data_ptr<at::Half>() + off, n);
    case at::kBFloat16: return at::vec::convert(in, t.data_ptr<at::BFloat16>() + off, n);
    default: TORCH_CHECK(false, "unreachable: dtype checked before");
  }
}

}  // namespace ntkcl_fast
