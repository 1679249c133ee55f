// CUDA kernel of ntkcl_fast::adamr_step_: one launch per device for the whole parameter list
// (params, grads, both moments and anchors travel in one Depth-5 chunk table), any mix of
// param / moment / anchor dtypes; grads have the params' dtype. Minimum traffic: read params,
// grads, both moments and anchors once, write params and moments once.
#include <torch/library.h>

#include "../adamr_checks.h"
#include "multi_tensor_apply.cuh"
#include "pack.cuh"

namespace ntkcl_fast {
namespace {

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

// Table lists: 0 params, 1 grads (params' dtype), 2 exp_avg, 3 exp_avg_sq (exp_avg's dtype), 4 anchors.
struct AdamRFunctor {
  AdamRHyper h;

  __device__ __forceinline__ void operator()(const mta::Table<5, double>& table, int t, int64_t begin,
                                             int64_t end) const {
    mta::visit_dtypes([&](auto p_type, auto s_type, auto a_type) {
      using P = decltype(p_type);
      using S = decltype(s_type);
      using A = decltype(a_type);
      using Acc = mta::AccOf<P, S>;
      const auto op = [&](int64_t, auto lanes, Acc* p, Acc* g, Acc* m, Acc* v, Acc* a) {
#pragma unroll
        for (int k = 0; k < lanes; ++k) adamr_element<Acc>(p[k], g[k], m[k], v[k], a[k], h);
      };
      mta::for_each_pack<Acc>(begin, end, op, mta::updates(mta::list_ptr<P>(table, 0, t)),
                              mta::reads(mta::list_ptr<const P>(table, 1, t)),
                              mta::updates(mta::list_ptr<S>(table, 2, t)), mta::updates(mta::list_ptr<S>(table, 3, t)),
                              mta::reads(mta::list_ptr<const A>(table, 4, t)));
    }, table.dtype[0][t], table.dtype[2][t], table.dtype[4][t]);
  }
};

void adamr_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                     at::TensorList anchors, at::ArrayRef<double> hyper, bool l1) {
  check_adamr_args(params, grads, exp_avg, exp_avg_sq, anchors, hyper, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const AdamRFunctor functor{{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6], hyper[7], l1}};
  mta::multi_tensor_apply<5, double>({params, grads, exp_avg, exp_avg_sq, anchors}, {}, functor);
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) { m.impl("adamr_step_", &adamr_step_cuda); }

}  // namespace ntkcl_fast
