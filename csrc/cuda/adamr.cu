// CUDA kernel of ntkcl_fast::adamr_step_: one launch per device for the whole parameter list
// (params, grads, both moments and anchors travel in one Depth-5 chunk table), any mix of
// param / moment / anchor dtypes; grads have the params' dtype.
#include <torch/library.h>

#include "../penalty_checks.h"
#include "multi_tensor_apply.cuh"

namespace ntkcl_fast {
namespace {

using mta::kVec;
using mta::Pack;

struct AdamRHyper {
  double lr, beta1, beta2, eps, wd, pull, step_size, inv_sqrt_bc2;
  bool l1;
};

template <typename Acc>
__device__ __forceinline__ void adamr_element(Acc& p, Acc g, Acc& m, Acc& v, Acc a, const AdamRHyper& h) {
  const Acc b1 = static_cast<Acc>(h.beta1), b2 = static_cast<Acc>(h.beta2);
  m = b1 * m + (1 - b1) * g;
  v = b2 * v + (1 - b2) * g * g;
  Acc diff = p - a;
  if (h.l1) diff = static_cast<Acc>((diff > 0) - (diff < 0));
  p = p - static_cast<Acc>(h.lr) * (static_cast<Acc>(h.wd) * p + static_cast<Acc>(h.pull) * diff);
  p = p - static_cast<Acc>(h.step_size) * m / (sqrt(v) * static_cast<Acc>(h.inv_sqrt_bc2) + static_cast<Acc>(h.eps));
}

template <typename P, typename S, typename A>
__device__ __forceinline__ void adamr_chunk(P* __restrict__ p, const P* __restrict__ g, S* __restrict__ m,
                                            S* __restrict__ v, const A* __restrict__ a, int64_t begin, int64_t end,
                                            const AdamRHyper& h) {
  using Acc = std::conditional_t<std::is_same_v<P, double> || std::is_same_v<S, double>, double, float>;
  int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  if (mta::pack_aligned<P>(p) && mta::pack_aligned<P>(g) && mta::pack_aligned<S>(m) && mta::pack_aligned<S>(v) &&
      mta::pack_aligned<A>(a)) {
    for (; i + kVec <= end; i += static_cast<int64_t>(blockDim.x) * kVec) {
      Pack<P> pv = *reinterpret_cast<const Pack<P>*>(p + i);
      const Pack<P> gv = *reinterpret_cast<const Pack<P>*>(g + i);
      Pack<S> mv = *reinterpret_cast<const Pack<S>*>(m + i);
      Pack<S> vv = *reinterpret_cast<const Pack<S>*>(v + i);
      const Pack<A> av = *reinterpret_cast<const Pack<A>*>(a + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        Acc pk = static_cast<Acc>(pv.v[k]), mk = static_cast<Acc>(mv.v[k]), vk = static_cast<Acc>(vv.v[k]);
        adamr_element<Acc>(pk, static_cast<Acc>(gv.v[k]), mk, vk, static_cast<Acc>(av.v[k]), h);
        pv.v[k] = static_cast<P>(pk);
        mv.v[k] = static_cast<S>(mk);
        vv.v[k] = static_cast<S>(vk);
      }
      *reinterpret_cast<Pack<P>*>(p + i) = pv;
      *reinterpret_cast<Pack<S>*>(m + i) = mv;
      *reinterpret_cast<Pack<S>*>(v + i) = vv;
    }
    i = end - (end - begin) % kVec + threadIdx.x;
  } else {
    i = begin + threadIdx.x;
  }
  for (; i < end; i += blockDim.x) {
    Acc pk = static_cast<Acc>(p[i]), mk = static_cast<Acc>(m[i]), vk = static_cast<Acc>(v[i]);
    adamr_element<Acc>(pk, static_cast<Acc>(g[i]), mk, vk, static_cast<Acc>(a[i]), h);
    p[i] = static_cast<P>(pk);
    m[i] = static_cast<S>(mk);
    v[i] = static_cast<S>(vk);
  }
}

// Table lists: 0 params, 1 grads, 2 exp_avg, 3 exp_avg_sq, 4 anchors.
struct AdamRFunctor {
  AdamRHyper h;

  template <typename P, typename S, typename A>
  __device__ __forceinline__ void run(const mta::Table<5, double>& table, int t, int64_t begin, int64_t end) const {
    adamr_chunk(static_cast<P*>(table.ptr[0][t]), static_cast<const P*>(table.ptr[1][t]),
                static_cast<S*>(table.ptr[2][t]), static_cast<S*>(table.ptr[3][t]),
                static_cast<const A*>(table.ptr[4][t]), begin, end, h);
  }

  template <typename P, typename S>
  __device__ __forceinline__ void with_a(const mta::Table<5, double>& table, int t, int64_t begin, int64_t end) const {
    switch (table.dtype[4][t]) {
      case mta::kF32: return run<P, S, float>(table, t, begin, end);
      case mta::kF16: return run<P, S, at::Half>(table, t, begin, end);
      case mta::kBF16: return run<P, S, at::BFloat16>(table, t, begin, end);
      default: return run<P, S, double>(table, t, begin, end);
    }
  }

  template <typename P>
  __device__ __forceinline__ void with_s(const mta::Table<5, double>& table, int t, int64_t begin, int64_t end) const {
    switch (table.dtype[2][t]) {
      case mta::kF32: return with_a<P, float>(table, t, begin, end);
      case mta::kF16: return with_a<P, at::Half>(table, t, begin, end);
      case mta::kBF16: return with_a<P, at::BFloat16>(table, t, begin, end);
      default: return with_a<P, double>(table, t, begin, end);
    }
  }

  __device__ __forceinline__ void operator()(const mta::Table<5, double>& table, int t, int64_t begin,
                                             int64_t end) const {
    switch (table.dtype[0][t]) {
      case mta::kF32: return with_s<float>(table, t, begin, end);
      case mta::kF16: return with_s<at::Half>(table, t, begin, end);
      case mta::kBF16: return with_s<at::BFloat16>(table, t, begin, end);
      default: return with_s<double>(table, t, begin, end);
    }
  }
};

void adamr_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                     at::TensorList anchors, at::ArrayRef<double> hyper, bool l1) {
  const auto cuda = c10::DeviceType::CUDA;
  check_same_list(params, "params", params, "params", cuda);
  check_same_list(params, "params", grads, "grads", cuda);
  check_same_list(params, "params", exp_avg, "exp_avg", cuda);
  check_same_list(params, "params", exp_avg_sq, "exp_avg_sq", cuda);
  check_same_list(params, "params", anchors, "anchors", cuda);
  TORCH_CHECK_VALUE(hyper.size() == 8, "hyper must hold 8 values, got ", hyper.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(grads[i].scalar_type() == params[i].scalar_type(), "grads[", i, "] must have the dtype of params[", i, "]");
    TORCH_CHECK_TYPE(exp_avg[i].scalar_type() == exp_avg_sq[i].scalar_type(), "exp_avg[", i,
                     "] and exp_avg_sq[", i, "] must share a dtype");
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), "params[", i, "] is on ", params[i].device(),
                      ", params[0] on ", params[0].device(), ": one call takes tensors of one device");
  }
  if (params.empty()) return;
  const AdamRFunctor functor{{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6], hyper[7], l1}};
  mta::multi_tensor_apply<5, double>({params, grads, exp_avg, exp_avg_sq, anchors}, {}, functor);
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) { m.impl("adamr_step_", &adamr_step_cuda); }

}  // namespace ntkcl_fast
