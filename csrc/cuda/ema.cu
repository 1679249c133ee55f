// CUDA kernel of ntkcl_fast::ema_update_: one launch per device for the whole list, any mix of
// fp16/bf16/fp32/fp64 pairs in that launch (the dtype codes travel in the table and each block
// switches once), decay per tensor from the table or from a device scalar (no host sync).
#include <torch/library.h>

#include "../ema_checks.h"
#include "multi_tensor_apply.cuh"

namespace ntkcl_fast {
namespace {

using mta::kVec;
using mta::Pack;

template <typename E, typename S>
using AccOf = std::conditional_t<std::is_same_v<E, double> || std::is_same_v<S, double>, double, float>;

template <typename E, typename S>
__device__ __forceinline__ void ema_chunk(E* __restrict__ ema, const S* __restrict__ src, int64_t begin,
                                          int64_t end, double decay) {
  using Acc = AccOf<E, S>;
  const Acc w = static_cast<Acc>(1.0 - decay);
  int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  if (mta::pack_aligned<E>(ema) && mta::pack_aligned<S>(src)) {
    for (; i + kVec <= end; i += static_cast<int64_t>(blockDim.x) * kVec) {
      Pack<E> e = *reinterpret_cast<const Pack<E>*>(ema + i);
      const Pack<S> s = *reinterpret_cast<const Pack<S>*>(src + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const Acc ek = static_cast<Acc>(e.v[k]);
        e.v[k] = static_cast<E>(ek + w * (static_cast<Acc>(s.v[k]) - ek));
      }
      *reinterpret_cast<Pack<E>*>(ema + i) = e;
    }
    // the chunk's last (end - begin) % kVec elements: begin is a multiple of kVec
    i = end - (end - begin) % kVec + threadIdx.x;
  } else {
    i = begin + threadIdx.x;
  }
  for (; i < end; i += blockDim.x) {
    const Acc e = static_cast<Acc>(ema[i]);
    ema[i] = static_cast<E>(e + w * (static_cast<Acc>(src[i]) - e));
  }
}

struct EmaFunctor {
  const double* decay_on_device;  // null: per-tensor decays from the table

  template <typename E>
  __device__ __forceinline__ void with_src(const mta::Table<2, double>& table, int t, int64_t begin,
                                           int64_t end, double decay) const {
    E* ema = static_cast<E*>(table.ptr[0][t]);
    const void* src = table.ptr[1][t];
    switch (table.dtype[1][t]) {
      case mta::kF32: return ema_chunk(ema, static_cast<const float*>(src), begin, end, decay);
      case mta::kF16: return ema_chunk(ema, static_cast<const at::Half*>(src), begin, end, decay);
      case mta::kBF16: return ema_chunk(ema, static_cast<const at::BFloat16*>(src), begin, end, decay);
      default: return ema_chunk(ema, static_cast<const double*>(src), begin, end, decay);
    }
  }

  __device__ __forceinline__ void operator()(const mta::Table<2, double>& table, int t, int64_t begin,
                                             int64_t end) const {
    const double decay = decay_on_device ? *decay_on_device : table.scalar[t];
    switch (table.dtype[0][t]) {
      case mta::kF32: return with_src<float>(table, t, begin, end, decay);
      case mta::kF16: return with_src<at::Half>(table, t, begin, end, decay);
      case mta::kBF16: return with_src<at::BFloat16>(table, t, begin, end, decay);
      default: return with_src<double>(table, t, begin, end, decay);
    }
  }
};

void ema_update_cuda(at::TensorList ema, at::TensorList src, at::ArrayRef<double> decay,
                     const std::optional<at::Tensor>& decay_tensor) {
  check_ema_args(ema, src, decay, decay_tensor, c10::DeviceType::CUDA);
  if (ema.empty()) return;
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
  for (size_t i = 1; i < ema.size(); ++i) {
    TORCH_CHECK_VALUE(ema[i].device() == ema[0].device(), "ema[", i, "] is on ", ema[i].device(),
                      ", ema[0] on ", ema[0].device(), ": one call takes tensors of one device");
  }
  if (has_tensor) {
    TORCH_CHECK_VALUE(decay_tensor->device() == ema[0].device(), "decay_tensor must be on ", ema[0].device());
  }
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const EmaWork work = split_ema_pairs(ema, src, has_tensor ? at::ArrayRef<double>() : decay);
  // fp64 on device keeps the decay exact for every math type; the cast is a device op, no sync
  const at::Tensor decay64 = has_tensor ? decay_tensor->to(at::kDouble) : at::Tensor();
  const EmaFunctor functor{has_tensor ? decay64.const_data_ptr<double>() : nullptr};
  mta::multi_tensor_apply<2, double>({work.ema, work.src}, work.decay, functor);
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace ntkcl_fast
