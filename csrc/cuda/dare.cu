// CUDA kernels of ntkcl_fast::dare_, dare_multi_ and magnitude_prune_.
//
// dare_ and dare_multi_ share one multi-tensor kernel (multi_tensor_apply.cuh): the table carries
// each tensor's pointers, dtype, q and 64-bit Philox key, so a whole state dict is one launch.
// Each thread handles packs of 8 elements (16-byte loads for 2-byte dtypes, 2 x 16 for fp32):
// two Philox4x32-10 calls give the 8 draws, the keep test is an integer compare with T(p), the
// math runs in fp32 (fp64 for fp64) and is rounded once. All indices are 64-bit. In place
// (out == finetuned or out == base) is fine: every element is read before it is written, by
// the same thread. Nothing but the output is written: no mask, no temporaries.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../dare_checks.h"
#include "multi_tensor_apply.cuh"
#include "philox.h"

namespace ntkcl_fast {
namespace {

using mta::kVec;
using mta::Pack;

// Per-tensor scalars of the launch table.
struct DareScalar {
  double q;
  uint64_t key;
  constexpr DareScalar(int = 0) : q(0.0), key(0) {}
  constexpr DareScalar(double q_, uint64_t key_) : q(q_), key(key_) {}
};
using DareTable = mta::Table<3, DareScalar>;

struct DareFunctor {
  uint64_t threshold;
  uint64_t seed;
  bool has_base;            // false: delta mode, out <- kept ? finetuned / q : 0
  const void* q_rows;       // per-row q (float, double for fp64) of a single-tensor call, or null
  int64_t inner;            // elements per row when q_rows is set

  template <typename Acc>
  __device__ __forceinline__ Acc row_q(int64_t i, Acc q) const {
    return q_rows ? static_cast<const Acc*>(q_rows)[i / inner] : q;
  }

  template <typename Acc>
  __device__ __forceinline__ Acc merge(bool keep, Acc f, Acc b, Acc q) const {
    if (has_base) return keep ? b + (f - b) / q : b;
    return keep ? f / q : Acc(0);
  }

  template <typename T>
  __device__ __forceinline__ void chunk(const DareTable& table, int t, int64_t begin, int64_t end) const {
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    T* out = static_cast<T*>(table.ptr[0][t]);
    const T* fin = static_cast<const T*>(table.ptr[1][t]);
    const T* base = static_cast<const T*>(table.ptr[2][t]);
    const uint64_t key = table.scalar[t].key;
    const Acc q0 = static_cast<Acc>(table.scalar[t].q);
    int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec;
    if (mta::pack_aligned<T>(out) && mta::pack_aligned<T>(fin) && mta::pack_aligned<T>(base)) {
      for (; i + kVec <= end; i += static_cast<int64_t>(blockDim.x) * kVec) {
        const uint64_t j = static_cast<uint64_t>(i) >> 2;  // i is a multiple of 8
        const philox::U4 a = philox::dare_draws(j, key, seed);
        const philox::U4 c = philox::dare_draws(j + 1, key, seed);
        const Pack<T> f = *reinterpret_cast<const Pack<T>*>(fin + i);
        Pack<T> b;
        if (has_base) b = *reinterpret_cast<const Pack<T>*>(base + i);
        Pack<T> o;
        Acc q = row_q<Acc>(i, q0);
        const bool one_row = q_rows == nullptr || (i / inner) == ((i + kVec - 1) / inner);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const uint32_t u = k < 4 ? a.v[k] : c.v[k - 4];
          const Acc qk = one_row ? q : row_q<Acc>(i + k, q0);
          o.v[k] = static_cast<T>(merge<Acc>(philox::kept(u, threshold), static_cast<Acc>(f.v[k]),
                                             has_base ? static_cast<Acc>(b.v[k]) : Acc(0), qk));
        }
        *reinterpret_cast<Pack<T>*>(out + i) = o;
      }
      i = end - (end - begin) % kVec + threadIdx.x;  // the chunk's tail; begin is a multiple of kVec
    } else {
      i = begin + threadIdx.x;
    }
    for (; i < end; i += blockDim.x) {
      const philox::U4 w = philox::dare_draws(static_cast<uint64_t>(i) >> 2, key, seed);
      const Acc b = has_base ? static_cast<Acc>(base[i]) : Acc(0);
      out[i] = static_cast<T>(merge<Acc>(philox::kept(w.v[i & 3], threshold), static_cast<Acc>(fin[i]), b,
                                         row_q<Acc>(i, q0)));
    }
  }

  __device__ __forceinline__ void operator()(const DareTable& table, int t, int64_t begin, int64_t end) const {
    switch (table.dtype[0][t]) {
      case mta::kF32: return chunk<float>(table, t, begin, end);
      case mta::kF16: return chunk<at::Half>(table, t, begin, end);
      case mta::kBF16: return chunk<at::BFloat16>(table, t, begin, end);
      default: return chunk<double>(table, t, begin, end);
    }
  }
};

void dare_cuda(const at::Tensor& out, const at::Tensor& finetuned, const std::optional<at::Tensor>& base,
               int64_t threshold, double q, const std::optional<at::Tensor>& q_rows, int64_t seed, int64_t key) {
  const at::Tensor* b = base.has_value() && base->defined() ? &*base : nullptr;
  check_threshold(threshold);
  check_dare_one(out, finetuned, b, q, q_rows, c10::DeviceType::CUDA);
  if (out.numel() == 0) return;
  const bool rows = q_rows.has_value() && q_rows->defined();
  const DareFunctor functor{static_cast<uint64_t>(threshold), static_cast<uint64_t>(seed), b != nullptr,
                            rows ? q_rows->const_data_ptr() : nullptr,
                            rows ? out.numel() / out.size(0) : int64_t{1}};
  const at::Tensor& base_or_fin = b ? *b : finetuned;  // delta mode never reads list 2
  mta::multi_tensor_apply<3, DareScalar>({at::TensorList(out), at::TensorList(finetuned), at::TensorList(base_or_fin)},
                                         {DareScalar(q, static_cast<uint64_t>(key))}, functor);
}

void dare_multi_cuda(at::TensorList out, at::TensorList finetuned, at::TensorList base, int64_t threshold,
                     at::ArrayRef<double> q, int64_t seed, at::ArrayRef<int64_t> keys) {
  check_dare_multi_args(out, finetuned, base, threshold, q, keys, c10::DeviceType::CUDA);
  std::vector<DareScalar> scalars;
  for (size_t i = 0; i < out.size(); ++i) scalars.emplace_back(q[i], static_cast<uint64_t>(keys[i]));
  const DareFunctor functor{static_cast<uint64_t>(threshold), static_cast<uint64_t>(seed), true, nullptr, 1};
  mta::multi_tensor_apply<3, DareScalar>({out, finetuned, base}, scalars, functor);
}

// Exact k through ATen's radix select (kthvalue), then the ties at the k-th magnitude are kept in
// index order (a cumulative count) until k entries are kept; no host sync, no full sort.
void magnitude_prune_cuda(const at::Tensor& delta, int64_t k) {
  TORCH_CHECK_TYPE(is_supported_float(delta.scalar_type()), "delta must be fp16/bf16/fp32/fp64");
  TORCH_CHECK_VALUE(delta.is_contiguous(), "delta must be contiguous");
  const int64_t n = delta.numel();
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "k must be in [0, numel]");
  if (k >= n) return;
  at::Tensor flat = delta.view({-1});
  if (k == 0) {
    flat.zero_();
    return;
  }
  at::Tensor mag = flat.abs();
  if (mag.scalar_type() != at::kDouble) mag = mag.to(at::kFloat);
  const at::Tensor kth = std::get<0>(at::kthvalue(mag, n - k + 1));
  const at::Tensor greater = mag > kth;
  const at::Tensor ties = mag == kth;
  const at::Tensor room = k - greater.sum();
  const at::Tensor keep = greater.logical_or(ties.logical_and(ties.cumsum(0) <= room));
  flat.masked_fill_(keep.logical_not(), 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) {
  m.impl("dare_", &dare_cuda);
  m.impl("dare_multi_", &dare_multi_cuda);
  m.impl("magnitude_prune_", &magnitude_prune_cuda);
}

}  // namespace ntkcl_fast
