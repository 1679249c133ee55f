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
#include <limits>
#include <torch/library.h>

#include "../dare_checks.h"
#include "multi_tensor_apply.cuh"
#include "pack.cuh"
#include "philox.h"

namespace ntkcl_fast {
namespace {

// Per-tensor scalars of the launch table.
struct DareScalar {
  double q;
  uint64_t key;
  constexpr DareScalar(int = 0) : q(0.0), key(0) {}
  constexpr DareScalar(double q_, uint64_t key_) : q(q_), key(key_) {}
};
using DareTable = mta::Table<3, DareScalar>;

// Table lists: 0 out, 1 finetuned, 2 base (finetuned again in delta mode, never read); all of
// one dtype.
struct DareFunctor {
  uint64_t threshold;
  uint64_t seed;
  bool has_base;            // false: delta mode, out <- kept ? finetuned / q : 0
  const void* q_rows;       // per-row q (float, double for fp64) of a single-tensor call, or null
  int64_t inner;            // elements per row when q_rows is set
  int64_t offset;           // global flat index of element 0 (a shard's place in the whole tensor)

  template <typename Acc>
  __device__ __forceinline__ Acc row_q(int64_t i, Acc q) const {
    return q_rows ? static_cast<const Acc*>(q_rows)[i / inner] : q;
  }

  __device__ __forceinline__ void operator()(const DareTable& table, int t, int64_t begin, int64_t end) const {
    const uint64_t key = table.scalar[t].key;
    mta::visit_dtype(table.dtype[0][t], [&](auto type) {
      using T = decltype(type);
      using Acc = mta::AccOf<T>;
      const Acc q0 = static_cast<Acc>(table.scalar[t].q);
      // lanes == kVec: i is a multiple of 8, two Philox calls give the 8 draws; else one element
      const auto op = [&](int64_t i, auto lanes, Acc* out, Acc* f, Acc* b) {
        constexpr int kLanes = decltype(lanes)::value;
        uint32_t u[kLanes];
        const uint64_t g = static_cast<uint64_t>(i + offset);  // the global index of element i
        if constexpr (kLanes == mta::kVec) {
          if ((g & 3) == 0) {
            const philox::U4 lo = philox::dare_draws(g >> 2, key, seed);
            const philox::U4 hi = philox::dare_draws((g >> 2) + 1, key, seed);
#pragma unroll
            for (int k = 0; k < kLanes; ++k) u[k] = k < 4 ? lo.v[k] : hi.v[k - 4];
          } else {  // a shard that starts inside a group of 4: the 8 draws span three counters
            const philox::U4 w[3] = {philox::dare_draws(g >> 2, key, seed),
                                     philox::dare_draws((g >> 2) + 1, key, seed),
                                     philox::dare_draws((g >> 2) + 2, key, seed)};
            const int s = static_cast<int>(g & 3);
#pragma unroll
            for (int k = 0; k < kLanes; ++k) u[k] = w[(s + k) >> 2].v[(s + k) & 3];
          }
        } else {
          u[0] = philox::dare_draws(g >> 2, key, seed).v[g & 3];
        }
        const Acc q = row_q<Acc>(i, q0);
        const bool one_row = q_rows == nullptr || (i / inner) == ((i + kLanes - 1) / inner);
#pragma unroll
        for (int k = 0; k < kLanes; ++k) {
          const Acc qk = one_row ? q : row_q<Acc>(i + k, q0);
          const bool keep = philox::kept(u[k], threshold);
          out[k] = has_base ? (keep ? b[k] + (f[k] - b[k]) / qk : b[k]) : (keep ? f[k] / qk : Acc(0));
        }
      };
      // in place (out == finetuned or base) is fine: for_each_pack reads every operand first
      mta::for_each_pack<Acc>(begin, end, op, mta::writes(mta::list_ptr<T>(table, 0, t)),
                              mta::reads(mta::list_ptr<const T>(table, 1, t)),
                              mta::reads(has_base ? mta::list_ptr<const T>(table, 2, t) : nullptr));
    });
  }
};

void dare_cuda(const at::Tensor& out, const at::Tensor& finetuned, const std::optional<at::Tensor>& base,
               int64_t threshold, double q, const std::optional<at::Tensor>& q_rows, int64_t seed, int64_t key,
               int64_t offset) {
  const at::Tensor* b = base.has_value() && base->defined() ? &*base : nullptr;
  check_threshold(threshold);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  check_dare_one(out, finetuned, b, q, q_rows, c10::DeviceType::CUDA);
  if (out.numel() == 0) return;
  const bool rows = q_rows.has_value() && q_rows->defined();
  const DareFunctor functor{static_cast<uint64_t>(threshold), static_cast<uint64_t>(seed), b != nullptr,
                            rows ? q_rows->const_data_ptr() : nullptr,
                            rows ? out.numel() / out.size(0) : int64_t{1}, offset};
  const at::Tensor& base_or_fin = b ? *b : finetuned;  // delta mode never reads list 2
  mta::multi_tensor_apply<3, DareScalar>({at::TensorList(out), at::TensorList(finetuned), at::TensorList(base_or_fin)},
                                         {DareScalar(q, static_cast<uint64_t>(key))}, functor);
}

void dare_multi_cuda(at::TensorList out, at::TensorList finetuned, at::TensorList base, int64_t threshold,
                     at::ArrayRef<double> q, int64_t seed, at::ArrayRef<int64_t> keys) {
  check_dare_multi_args(out, finetuned, base, threshold, q, keys, c10::DeviceType::CUDA);
  std::vector<DareScalar> scalars;
  for (size_t i = 0; i < out.size(); ++i) scalars.emplace_back(q[i], static_cast<uint64_t>(keys[i]));
  const DareFunctor functor{static_cast<uint64_t>(threshold), static_cast<uint64_t>(seed), true, nullptr, 1, 0};
  mta::multi_tensor_apply<3, DareScalar>({out, finetuned, base}, scalars, functor);
}

// Exact k through ATen's radix select (kthvalue), then the ties at the k-th magnitude are kept in
// index order (a cumulative count) until k entries are kept; no host sync, no full sort.
void magnitude_prune_cuda(const at::Tensor& delta, int64_t k) {
  check_float(delta, Arg{"delta"});
  check_writable(delta, Arg{"delta"});
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
  // Rank keys: the bits of a non-negative float order as its value does, and one canonical NaN
  // pattern sits above +inf, so NaN entries rank first and equal, as in a descending torch.sort
  // (API.md); integer keys keep the selection free of any NaN convention of kthvalue.
  const bool wide = mag.scalar_type() == at::kDouble;
  const at::Tensor key = at::where(mag.isnan(), std::numeric_limits<double>::quiet_NaN(), mag)
                             .view(wide ? at::kLong : at::kInt);
  const at::Tensor kth = std::get<0>(at::kthvalue(key, n - k + 1));
  const at::Tensor greater = key > kth;
  const at::Tensor ties = key == kth;
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
