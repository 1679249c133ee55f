// Tile I/O of the CPU multi-tensor kernels: up to kTile elements of one tensor, in the math type
// Acc (float for 16-bit and fp32 tensors, double when fp64 is involved), converted once on load
// and once on store with at::vec. A tensor that already holds Acc is used in place, no copy.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace ntkcl_fast {
namespace cpu {

constexpr int64_t kTile = 256;  // elements: five fp32 tiles stay in L1

// Calls f(T{}) with T the C++ type of a supported floating dtype (checked before).
template <typename F>
decltype(auto) visit_float(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "unreachable: dtype checked before");
  }
}

template <typename Acc>
constexpr at::ScalarType kAccType = std::is_same_v<Acc, double> ? at::kDouble : at::kFloat;

// out[0, n) <- elements [off, off + n) of t, converted to Acc.
template <typename Acc>
void load_tile(const at::Tensor& t, int64_t off, int64_t n, Acc* out) {
  visit_float(t.scalar_type(), [&](auto v) { at::vec::convert(t.const_data_ptr<decltype(v)>() + off, out, n); });
}

// Elements [off, off + n) of t <- in[0, n), rounded once to t's dtype.
template <typename Acc>
void store_tile(const at::Tensor& t, int64_t off, int64_t n, const Acc* in) {
  visit_float(t.scalar_type(), [&](auto v) { at::vec::convert(in, t.data_ptr<decltype(v)>() + off, n); });
}

// A tile that uses the tensor's memory in place when it holds Acc, else converts through its
// own buffer.
template <typename Acc>
class Tile {
 public:
  // Elements [off, off + n) of t, read only.
  const Acc* read(const at::Tensor& t, int64_t off, int64_t n) {
    if (t.scalar_type() == kAccType<Acc>) return data_ = const_cast<Acc*>(t.const_data_ptr<Acc>()) + off;
    load_tile(t, off, n, buf_);
    return data_ = buf_;
  }

  // Elements [off, off + n) of t, to be changed and then stored.
  Acc* load(const at::Tensor& t, int64_t off, int64_t n) {
    if (t.scalar_type() == kAccType<Acc>) return data_ = t.data_ptr<Acc>() + off;
    load_tile(t, off, n, buf_);
    return data_ = buf_;
  }

  // Room for elements [off, off + n) of t, written without being read.
  Acc* open(const at::Tensor& t, int64_t off) {
    return data_ = t.scalar_type() == kAccType<Acc> ? t.data_ptr<Acc>() + off : buf_;
  }

  // Writes the tile back to [off, off + n) of t: a conversion, or nothing when it is t's memory.
  void store(const at::Tensor& t, int64_t off, int64_t n) const {
    if (data_ == buf_) store_tile(t, off, n, buf_);
  }

 private:
  alignas(64) Acc buf_[kTile];
  Acc* data_ = buf_;
};

}  // namespace cpu
}  // namespace ntkcl_fast
