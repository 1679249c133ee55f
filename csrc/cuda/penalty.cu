// CUDA kernels of the L2 / EWC ops: one launch per device for the whole list (plus one tiny
// fixed-order reduction of the per-block partial sums), any mix of fp16/bf16/fp32/fp64 params,
// anchors and importance in that launch. Element math in fp32 (fp64 when a side is fp64); the
// per-element terms are summed in double, per thread, then per block with a fixed tree.
#include <torch/library.h>

#include "../penalty_checks.h"
#include "multi_tensor_apply.cuh"

namespace ntkcl_fast {
namespace {

using mta::kVec;
using mta::Pack;

template <typename... T>
using AccOf = std::conditional_t<(std::is_same_v<T, double> || ...), double, float>;

// This thread's share of sum F * (p - a)^2 over [begin, end); when g is given also writes
// g <- [g +] coef * F * (p - a).
template <typename P, typename A, typename F>
__device__ __forceinline__ double l2_chunk(const P* __restrict__ p, const A* __restrict__ a, const F* __restrict__ f,
                                           P* __restrict__ g, int64_t begin, int64_t end, bool accumulate,
                                           double coef_d) {
  using Acc = AccOf<P, A, F>;
  const Acc coef = static_cast<Acc>(coef_d);
  double sum = 0.0;
  int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  const bool aligned = mta::pack_aligned<P>(p) && mta::pack_aligned<A>(a) &&
                       (f == nullptr || mta::pack_aligned<F>(f)) && (g == nullptr || mta::pack_aligned<P>(g));
  if (aligned) {
    for (; i + kVec <= end; i += static_cast<int64_t>(blockDim.x) * kVec) {
      const Pack<P> pv = *reinterpret_cast<const Pack<P>*>(p + i);
      const Pack<A> av = *reinterpret_cast<const Pack<A>*>(a + i);
      Pack<F> fv{};
      if (f) fv = *reinterpret_cast<const Pack<F>*>(f + i);
      Pack<P> gv{};
      if (g && accumulate) gv = *reinterpret_cast<const Pack<P>*>(g + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const Acc d = static_cast<Acc>(pv.v[k]) - static_cast<Acc>(av.v[k]);
        const Acc fd = f ? static_cast<Acc>(fv.v[k]) * d : d;
        sum += static_cast<double>(fd * d);
        const Acc step = coef * fd;
        gv.v[k] = static_cast<P>(accumulate ? step + static_cast<Acc>(gv.v[k]) : step);
      }
      if (g) *reinterpret_cast<Pack<P>*>(g + i) = gv;
    }
    i = end - (end - begin) % kVec + threadIdx.x;  // begin is a multiple of kVec
  } else {
    i = begin + threadIdx.x;
  }
  for (; i < end; i += blockDim.x) {
    const Acc d = static_cast<Acc>(p[i]) - static_cast<Acc>(a[i]);
    const Acc fd = f ? static_cast<Acc>(f[i]) * d : d;
    sum += static_cast<double>(fd * d);
    if (g) {
      const Acc step = coef * fd;
      g[i] = static_cast<P>(accumulate ? step + static_cast<Acc>(g[i]) : step);
    }
  }
  return sum;
}

// Table lists: 0 params, 1 anchors, 2 importance (params again when absent), 3 grads (params
// again when absent; grads have the params' dtype).
struct L2Functor {
  bool has_f, has_g, accumulate;
  double coef;                   // 2 * scale (times grad_output when that is not on device)
  const double* grad_output;     // null: 1

  template <typename P, typename A, typename F>
  __device__ __forceinline__ double run(const mta::Table<4, double>& table, int t, int64_t begin, int64_t end) const {
    const double c = grad_output ? coef * *grad_output : coef;
    return l2_chunk(static_cast<const P*>(table.ptr[0][t]), static_cast<const A*>(table.ptr[1][t]),
                    has_f ? static_cast<const F*>(table.ptr[2][t]) : nullptr,
                    has_g ? static_cast<P*>(table.ptr[3][t]) : nullptr, begin, end, accumulate, c);
  }

  template <typename P, typename A>
  __device__ __forceinline__ double with_f(const mta::Table<4, double>& table, int t, int64_t begin, int64_t end) const {
    switch (has_f ? table.dtype[2][t] : table.dtype[1][t]) {  // no importance: F is a dummy, take A
      case mta::kF32: return run<P, A, float>(table, t, begin, end);
      case mta::kF16: return run<P, A, at::Half>(table, t, begin, end);
      case mta::kBF16: return run<P, A, at::BFloat16>(table, t, begin, end);
      default: return run<P, A, double>(table, t, begin, end);
    }
  }

  template <typename P>
  __device__ __forceinline__ double with_a(const mta::Table<4, double>& table, int t, int64_t begin, int64_t end) const {
    switch (table.dtype[1][t]) {
      case mta::kF32: return with_f<P, float>(table, t, begin, end);
      case mta::kF16: return with_f<P, at::Half>(table, t, begin, end);
      case mta::kBF16: return with_f<P, at::BFloat16>(table, t, begin, end);
      default: return with_f<P, double>(table, t, begin, end);
    }
  }

  __device__ __forceinline__ double operator()(const mta::Table<4, double>& table, int t, int64_t begin,
                                               int64_t end) const {
    switch (table.dtype[0][t]) {
      case mta::kF32: return with_a<float>(table, t, begin, end);
      case mta::kF16: return with_a<at::Half>(table, t, begin, end);
      case mta::kBF16: return with_a<at::BFloat16>(table, t, begin, end);
      default: return with_a<double>(table, t, begin, end);
    }
  }
};

at::Tensor l2_run(at::TensorList grads, at::TensorList params, at::TensorList anchors, at::TensorList importance,
                  double scale, const std::optional<at::Tensor>& grad_output, bool accumulate) {
  if (params.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions on_device = params[0].options();
  at::Tensor out = at::empty({}, on_device.dtype(at::kFloat));
  const int64_t slots = mta::chunk_count(params);
  if (slots == 0) return out.zero_();
  at::Tensor partials = at::empty({slots}, on_device.dtype(at::kDouble));
  const bool has_go = grad_output.has_value() && grad_output->defined();
  // fp64 on device keeps grad_output exact for every math type; the cast is a device op, no sync
  const at::Tensor go64 = has_go ? grad_output->to(at::kDouble) : at::Tensor();
  const L2Functor functor{!importance.empty(), !grads.empty(), accumulate, 2.0 * scale,
                          has_go ? go64.const_data_ptr<double>() : nullptr};
  const at::TensorList f_list = importance.empty() ? params : importance;
  const at::TensorList g_list = grads.empty() ? params : grads;
  mta::multi_tensor_apply_partials<4, double>({params, anchors, f_list, g_list}, {}, functor,
                                              partials.data_ptr<double>());
  mta::reduce_partials(partials.const_data_ptr<double>(), slots, scale, out.data_ptr<float>(), stream);
  return out;
}

at::Tensor l2_penalty_cuda(at::TensorList params, at::TensorList anchors, at::TensorList importance, double scale) {
  check_l2_args({}, params, anchors, importance, scale, std::nullopt, c10::DeviceType::CUDA);
  return l2_run({}, params, anchors, importance, scale, std::nullopt, false);
}

at::Tensor l2_penalty_grad_cuda(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                                at::TensorList importance, double scale, const std::optional<at::Tensor>& grad_output,
                                bool accumulate) {
  check_l2_args(grads, params, anchors, importance, scale, grad_output, c10::DeviceType::CUDA);
  TORCH_CHECK_VALUE(grads.size() == params.size(), "grads must have one tensor per params");
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_TYPE(grads[i].scalar_type() == params[i].scalar_type(), "grads[", i,
                     "] must have the dtype of params[", i, "]");
  }
  return l2_run(grads, params, anchors, importance, scale, grad_output, accumulate);
}

template <typename FI, typename GR>
__device__ __forceinline__ void fisher_chunk(FI* __restrict__ fisher, const GR* __restrict__ grads, int64_t begin,
                                             int64_t end, double scale_d, double decay_d) {
  using Acc = AccOf<FI, GR>;
  const Acc scale = static_cast<Acc>(scale_d), decay = static_cast<Acc>(decay_d);
  int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  if (mta::pack_aligned<FI>(fisher) && mta::pack_aligned<GR>(grads)) {
    for (; i + kVec <= end; i += static_cast<int64_t>(blockDim.x) * kVec) {
      Pack<FI> f = *reinterpret_cast<const Pack<FI>*>(fisher + i);
      const Pack<GR> g = *reinterpret_cast<const Pack<GR>*>(grads + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const Acc gk = static_cast<Acc>(g.v[k]);
        f.v[k] = static_cast<FI>(decay * static_cast<Acc>(f.v[k]) + scale * (gk * gk));
      }
      *reinterpret_cast<Pack<FI>*>(fisher + i) = f;
    }
    i = end - (end - begin) % kVec + threadIdx.x;
  } else {
    i = begin + threadIdx.x;
  }
  for (; i < end; i += blockDim.x) {
    const Acc gk = static_cast<Acc>(grads[i]);
    fisher[i] = static_cast<FI>(decay * static_cast<Acc>(fisher[i]) + scale * (gk * gk));
  }
}

struct FisherFunctor {
  double scale, decay;

  template <typename FI>
  __device__ __forceinline__ void with_g(const mta::Table<2, double>& table, int t, int64_t begin, int64_t end) const {
    FI* fisher = static_cast<FI*>(table.ptr[0][t]);
    const void* g = table.ptr[1][t];
    switch (table.dtype[1][t]) {
      case mta::kF32: return fisher_chunk(fisher, static_cast<const float*>(g), begin, end, scale, decay);
      case mta::kF16: return fisher_chunk(fisher, static_cast<const at::Half*>(g), begin, end, scale, decay);
      case mta::kBF16: return fisher_chunk(fisher, static_cast<const at::BFloat16*>(g), begin, end, scale, decay);
      default: return fisher_chunk(fisher, static_cast<const double*>(g), begin, end, scale, decay);
    }
  }

  __device__ __forceinline__ void operator()(const mta::Table<2, double>& table, int t, int64_t begin,
                                             int64_t end) const {
    switch (table.dtype[0][t]) {
      case mta::kF32: return with_g<float>(table, t, begin, end);
      case mta::kF16: return with_g<at::Half>(table, t, begin, end);
      case mta::kBF16: return with_g<at::BFloat16>(table, t, begin, end);
      default: return with_g<double>(table, t, begin, end);
    }
  }
};

void fisher_accumulate_cuda(at::TensorList fisher, at::TensorList grads, double scale, double decay) {
  check_fisher_args(fisher, grads, scale, decay, c10::DeviceType::CUDA);
  if (fisher.empty()) return;
  mta::multi_tensor_apply<2, double>({fisher, grads}, {}, FisherFunctor{scale, decay});
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) {
  m.impl("l2_penalty", &l2_penalty_cuda);
  m.impl("l2_penalty_grad_", &l2_penalty_grad_cuda);
  m.impl("fisher_accumulate_", &fisher_accumulate_cuda);
}

}  // namespace ntkcl_fast
