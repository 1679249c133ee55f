// CUDA kernel of ntkcl_fast::ema_update_: one launch per device for the whole list, any mix of
// fp16/bf16/fp32/fp64 pairs in that launch (the dtype codes travel in the table and each block
// switches once), decay per tensor from the table or from a device scalar (no host sync, so the
// launch is CUDA-graph capturable). Minimum traffic: read ema and src, write ema, once each.
#include <torch/library.h>

#include "../ema_checks.h"
#include "multi_tensor_apply.cuh"
#include "pack.cuh"

namespace ntkcl_fast {
namespace {

// Table lists: 0 ema, 1 src; scalar: the pair's decay.
struct EmaFunctor {
  const double* decay_on_device;  // null: per-tensor decays from the table

  __device__ __forceinline__ void operator()(const mta::Table<2, double>& table, int t, int64_t begin,
                                             int64_t end) const {
    const double decay = decay_on_device ? *decay_on_device : table.scalar[t];
    mta::visit_dtypes([&](auto e, auto s) {
      using E = decltype(e);
      using S = decltype(s);
      using Acc = mta::AccOf<E, S>;
      // torch.lerp(ema, src, w) as ATen computes it (Lerp.h, contracted to FMAs by nvcc):
      // w < 0.5 ? fma(w, src - ema, ema) : fma(w - 1, src - ema, src), so decay 0 copies src
      // exactly. The weight is the tensor's, so the branch is uniform across the block.
      const Acc w = static_cast<Acc>(1.0 - decay);
      const bool from_ema = w < Acc(0.5);
      const Acc coeff = from_ema ? w : w - Acc(1);  // exact: w is in [0.5, 1]
      const auto op = [&](int64_t, auto lanes, Acc* ema, Acc* src) {
#pragma unroll
        for (int k = 0; k < lanes; ++k) ema[k] = fma(coeff, src[k] - ema[k], from_ema ? ema[k] : src[k]);
      };
      mta::for_each_pack<Acc>(begin, end, op, mta::updates(mta::list_ptr<E>(table, 0, t)),
                              mta::reads(mta::list_ptr<const S>(table, 1, t)));
    }, table.dtype[0][t], table.dtype[1][t]);
  }
};

void ema_update_cuda(at::TensorList ema, at::TensorList src, at::ArrayRef<double> decay,
                     const std::optional<at::Tensor>& decay_tensor) {
  check_ema_args(ema, src, decay, decay_tensor, c10::DeviceType::CUDA);
  if (ema.empty()) return;
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
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
