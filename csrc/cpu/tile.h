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

// Tiles of one tensor, read only: each tile is the tensor's memory when it holds Acc, else a
// converted copy. Bound once per chunk, so the per-tile cost is the conversion alone.
template <typename Acc>
class ReadTile {
 public:
  explicit ReadTile(const at::Tensor& t) : dtype_(t.scalar_type()), base_(t.const_data_ptr()) {}

  // Elements [off, off + n).
  const Acc* read(int64_t off, int64_t n) {
    if (dtype_ == kAccType<Acc>) return static_cast<const Acc*>(base_) + off;
    visit_float(dtype_, [&](auto v) { at::vec::convert(static_cast<const decltype(v)*>(base_) + off, buf_, n); });
    return buf_;
  }

 private:
  at::ScalarType dtype_;
  const void* base_;
  alignas(64) Acc buf_[kTile];
};

// Tiles of one tensor that is written: changed in place when it holds Acc, else through a
// converted copy that store() rounds back once.
template <typename Acc>
class WriteTile {
 public:
  explicit WriteTile(const at::Tensor& t) : dtype_(t.scalar_type()), base_(t.data_ptr()) {}

  // Elements [off, off + n), to be changed and then stored.
  Acc* load(int64_t off, int64_t n) {
    if (in_place()) return static_cast<Acc*>(base_) + off;
    visit_float(dtype_, [&](auto v) { at::vec::convert(static_cast<const decltype(v)*>(base_) + off, buf_, n); });
    return buf_;
  }

  // Room for elements [off, off + n), written without being read.
  Acc* open(int64_t off) { return in_place() ? static_cast<Acc*>(base_) + off : buf_; }

  // Writes back what load() or open() handed out: a conversion, or nothing in place.
  void store(int64_t off, int64_t n) const {
    if (in_place()) return;
    visit_float(dtype_, [&](auto v) { at::vec::convert(buf_, static_cast<decltype(v)*>(base_) + off, n); });
  }

 private:
  bool in_place() const { return dtype_ == kAccType<Acc>; }

  at::ScalarType dtype_;
  void* base_;
  alignas(64) Acc buf_[kTile];
};

}  // namespace cpu
}  // namespace ntkcl_fast
