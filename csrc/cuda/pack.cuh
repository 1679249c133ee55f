// The per-chunk half of multi_tensor_apply: dtype dispatch on the table's dtype codes and the
// element loop every functor shares (packs of kVec elements with vectorized loads, then the
// chunk's tail one element at a time), so a functor is only its element math.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "multi_tensor_apply.cuh"

namespace ntkcl_fast {
namespace mta {

// Calls f(T{}) with T the C++ type of a dtype code of the table.
template <typename F>
__device__ __forceinline__ decltype(auto) visit_dtype(uint8_t code, const F& f) {
  switch (code) {
    case kF32: return f(float{});
    case kF16: return f(at::Half{});
    case kBF16: return f(at::BFloat16{});
    default: return f(double{});
  }
}

// visit_dtypes(f, c0, c1, ...) calls f(T0{}, T1{}, ...): one switch per code, nested.
template <typename F>
__device__ __forceinline__ decltype(auto) visit_dtypes(const F& f) {
  return f();
}

template <typename F, typename... Codes>
__device__ __forceinline__ decltype(auto) visit_dtypes(const F& f, uint8_t code, Codes... rest) {
  return visit_dtype(code, [&](auto t) { return visit_dtypes([&](auto... more) { return f(t, more...); }, rest...); });
}

// Math type: float for 16-bit and fp32 inputs, double as soon as one input is fp64.
template <typename... T>
using AccOf = std::conditional_t<(std::is_same_v<T, double> || ...), double, float>;

template <typename T, int Depth, typename Scalar>
__device__ __forceinline__ T* list_ptr(const Table<Depth, Scalar>& table, int list, int t) {
  return static_cast<T*>(table.ptr[list][t]);
}

// Eight elements per access: 16 bytes for 2-byte dtypes, 2 x 16 bytes for fp32, 4 x 16 for fp64.
constexpr int kVec = 8;
template <typename T>
struct alignas(kVec * sizeof(T)) Pack {
  T v[kVec];
};

// One tensor of an element-wise pass: null, or not loaded, reads as 0; stored only when `store`.
template <typename T>
struct Operand {
  T* ptr;
  bool load, store;
};

template <typename T>
__device__ __forceinline__ Operand<T> reads(const T* p) {
  return {const_cast<T*>(p), p != nullptr, false};
}

template <typename T>
__device__ __forceinline__ Operand<T> updates(T* p) {
  return {p, p != nullptr, p != nullptr};
}

template <typename T>
__device__ __forceinline__ Operand<T> writes(T* p) {
  return {p, false, p != nullptr};
}

template <typename T>
__device__ __forceinline__ bool pack_aligned(const Operand<T>& x) {
  return x.ptr == nullptr || reinterpret_cast<uintptr_t>(x.ptr) % sizeof(Pack<T>) == 0;
}

// N consecutive elements from i (N = kVec in the pack loop, 1 in the tail) as math values.
template <int N, typename Acc, typename T>
__device__ __forceinline__ void load_lanes(const Operand<T>& x, int64_t i, Acc* v) {
  if constexpr (N == kVec) {
    Pack<T> p{};
    if (x.load) p = *reinterpret_cast<const Pack<T>*>(x.ptr + i);
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = static_cast<Acc>(p.v[k]);
  } else {
    v[0] = x.load ? static_cast<Acc>(x.ptr[i]) : Acc(0);
  }
}

template <int N, typename Acc, typename T>
__device__ __forceinline__ void store_lanes(const Operand<T>& x, int64_t i, const Acc* v) {
  if (!x.store) return;
  if constexpr (N == kVec) {
    Pack<T> p;
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = static_cast<T>(v[k]);
    *reinterpret_cast<Pack<T>*>(x.ptr + i) = p;
  } else {
    x.ptr[i] = static_cast<T>(v[0]);
  }
}

template <int N>
using Lanes = std::integral_constant<int, N>;

template <int N, typename Acc, typename Op, typename... T, size_t... I>
__device__ __forceinline__ void apply_lanes(const Op& op, int64_t i, std::index_sequence<I...>,
                                            const Operand<T>&... xs) {
  Acc v[sizeof...(T)][N];
  (load_lanes<N>(xs, i, v[I]), ...);  // every operand is read before any is written (in place is fine)
  op(i, Lanes<N>{}, v[I]...);
  (store_lanes<N>(xs, i, v[I]), ...);
}

// Element-wise pass over [begin, end) of one chunk by one block: op(i, lanes, x...) gets, for
// each operand, `lanes` consecutive elements from index i in math type Acc (pointers to
// registers), changes them, and the operands marked `store` are written back, rounded once.
// Packs of kVec elements when every operand is aligned (begin is a multiple of kVec), then the
// chunk's last (end - begin) % kVec elements one at a time; unaligned operands take that path
// for the whole chunk.
template <typename Acc, typename Op, typename... T>
__device__ __forceinline__ void for_each_pack(int64_t begin, int64_t end, const Op& op, const Operand<T>&... xs) {
  const auto lists = std::index_sequence_for<T...>{};
  int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  if ((pack_aligned(xs) && ...)) {
    for (; i + kVec <= end; i += static_cast<int64_t>(blockDim.x) * kVec) apply_lanes<kVec, Acc>(op, i, lists, xs...);
    i = end - (end - begin) % kVec + threadIdx.x;
  } else {
    i = begin + threadIdx.x;
  }
  for (; i < end; i += blockDim.x) apply_lanes<1, Acc>(op, i, lists, xs...);
}

}  // namespace mta
}  // namespace ntkcl_fast
