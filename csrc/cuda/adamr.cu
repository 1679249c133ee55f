// CUDA kernels of ntkcl_fast::adamr_step_ and ntkcl_fast::adamr_v_hat_sum: one launch per device for
// the whole parameter list each (chunk tables of multi_tensor_apply.cuh), any mix of param /
// moment / anchor dtypes; grads have the params' dtype. The step counts and DAREx's V are read
// from device memory, so a step never waits for the host. Minimum traffic of the step: read
// params, grads, the moments and anchors once, write params and moments once; the sum reads grads
// and the second moments and writes one double per chunk (a fixed-order reduction, no atomics).
#include <torch/library.h>

#include <optional>

#include "../adamr_checks.h"
#include "multi_tensor_apply.cuh"
#include "pack.cuh"

namespace ntkcl_fast {
namespace {

// Table lists of the step: 0 params, 1 grads (params' dtype), 2 exp_avg, 3 exp_avg_sq, 4 anchors,
// 5 max_exp_avg_sq (exp_avg_sq again without AMSGrad), 6 state_steps (0-d fp32).
constexpr int kStepLists = 7;
// Table lists of the sum: 0 grads, 1 exp_avg_sq, 2 max_exp_avg_sq (or exp_avg_sq), 3 state_steps.
constexpr int kSumLists = 4;

template <typename Acc>
__device__ __forceinline__ Acc max_nan(Acc a, Acc b) {  // torch.maximum: NaN from either side wins
  return (a > b || a != a) ? a : b;
}

template <int Depth>
__device__ __forceinline__ double step_taken(const mta::Table<Depth, float>& table, int list, int t) {
  return static_cast<double>(*static_cast<const float*>(table.ptr[list][t])) + 1.0;
}

struct AdamRStepFunctor {
  AdamRHyper h;
  bool amsgrad;
  const double* v_mean;  // null: the pull is scaled by lr alone (pull_scale="lr")

  __device__ __forceinline__ void operator()(const mta::Table<kStepLists, float>& table, int t, int64_t begin,
                                             int64_t end) const {
    const double step = step_taken(table, 6, t);
    const double step_size_d = h.lr / (1.0 - pow(h.beta1, step));
    const double inv_sqrt_bc2_d = 1.0 / sqrt(1.0 - pow(h.beta2, step));
    double coef_d = h.pull * h.lr;
    if (v_mean != nullptr && *v_mean != 0.0) coef_d /= sqrt(*v_mean);
    mta::visit_dtypes([&](auto p_type, auto s_type, auto a_type) {
      using P = decltype(p_type);
      using S = decltype(s_type);
      using A = decltype(a_type);
      using Acc = mta::AccOf<P, S>;
      const Acc b1 = static_cast<Acc>(h.beta1), b2 = static_cast<Acc>(h.beta2), eps = static_cast<Acc>(h.eps);
      const Acc decay = static_cast<Acc>(h.lr * h.weight_decay), coef = static_cast<Acc>(coef_d);
      const Acc step_size = static_cast<Acc>(step_size_d), inv_sqrt_bc2 = static_cast<Acc>(inv_sqrt_bc2_d);
      const bool ams = amsgrad, l1 = h.l1;
      const auto op = [&](int64_t, auto lanes, Acc* p, Acc* g, Acc* m, Acc* v, Acc* a, Acc* vm) {
#pragma unroll
        for (int k = 0; k < lanes; ++k) {
          m[k] = b1 * m[k] + (1 - b1) * g[k];
          v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k];
          Acc den = v[k];
          if (ams) den = vm[k] = max_nan(vm[k], v[k]);
          Acc diff = p[k] - a[k];
          if (l1) diff = static_cast<Acc>((diff > 0) - (diff < 0));
          Acc pk = p[k] - decay * p[k] - coef * diff;
          p[k] = pk - step_size * m[k] / (sqrt(den) * inv_sqrt_bc2 + eps);
        }
      };
      S* vm = ams ? mta::list_ptr<S>(table, 5, t) : nullptr;
      mta::for_each_pack<Acc>(begin, end, op, mta::updates(mta::list_ptr<P>(table, 0, t)),
                              mta::reads(mta::list_ptr<const P>(table, 1, t)),
                              mta::updates(mta::list_ptr<S>(table, 2, t)), mta::updates(mta::list_ptr<S>(table, 3, t)),
                              mta::reads(mta::list_ptr<const A>(table, 4, t)), mta::updates(vm));
    }, table.dtype[0][t], table.dtype[2][t], table.dtype[4][t]);
  }
};

// Each thread's share of sum(v_new (or its running max)) / bc2 over the chunk.
struct VHatSumFunctor {
  double beta2;
  bool amsgrad;

  __device__ __forceinline__ double operator()(const mta::Table<kSumLists, float>& table, int t, int64_t begin,
                                               int64_t end) const {
    const double inv_bc2 = 1.0 / (1.0 - pow(beta2, step_taken(table, 3, t)));
    return mta::visit_dtypes([&](auto g_type, auto s_type) {
      using G = decltype(g_type);
      using S = decltype(s_type);
      using Acc = mta::AccOf<G, S>;
      const Acc b2 = static_cast<Acc>(beta2);
      const bool ams = amsgrad;
      double sum = 0.0;
      const auto op = [&](int64_t, auto lanes, Acc* g, Acc* v, Acc* vm) {
#pragma unroll
        for (int k = 0; k < lanes; ++k) {
          const Acc vk = b2 * v[k] + (1 - b2) * g[k] * g[k];
          sum += static_cast<double>(ams ? max_nan(vm[k], vk) : vk);
        }
      };
      mta::for_each_pack<Acc>(begin, end, op, mta::reads(mta::list_ptr<const G>(table, 0, t)),
                              mta::reads(mta::list_ptr<const S>(table, 1, t)),
                              mta::reads(ams ? mta::list_ptr<const S>(table, 2, t) : nullptr));
      return sum * inv_bc2;
    }, table.dtype[0][t], table.dtype[1][t]);
  }
};

void adamr_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                     at::TensorList max_exp_avg_sq, at::TensorList anchors, at::TensorList state_steps,
                     const std::optional<at::Tensor>& v_mean, double lr, double beta1, double beta2, double eps,
                     double weight_decay, double pull, bool l1) {
  const AdamRHyper h{lr, beta1, beta2, eps, weight_decay, pull, l1};
  check_adamr_step_args(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean, h,
                        c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool has_v = v_mean.has_value() && v_mean->defined();
  const at::Tensor v64 = has_v ? v_mean->to(at::kDouble) : at::Tensor();  // a device cast, no sync
  const bool ams = !max_exp_avg_sq.empty();
  const AdamRStepFunctor functor{h, ams, has_v ? v64.const_data_ptr<double>() : nullptr};
  mta::multi_tensor_apply<kStepLists, float>(
      {params, grads, exp_avg, exp_avg_sq, anchors, ams ? max_exp_avg_sq : exp_avg_sq, state_steps}, {}, functor);
  at::_foreach_add_(state_steps, 1);  // after the kernel on the same stream, which read the old counts
}

at::Tensor adamr_v_hat_sum_cuda(at::TensorList grads, at::TensorList exp_avg_sq, at::TensorList max_exp_avg_sq,
                                at::TensorList state_steps, double beta2) {
  check_adamr_v_hat_sum_args(grads, exp_avg_sq, max_exp_avg_sq, state_steps, beta2, c10::DeviceType::CUDA);
  if (grads.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const at::TensorOptions on_device = grads[0].options().dtype(at::kDouble);
  const int64_t slots = mta::chunk_count(grads);
  if (slots == 0) return at::zeros({}, on_device);
  at::Tensor partials = at::empty({slots}, on_device);
  const bool ams = !max_exp_avg_sq.empty();
  mta::multi_tensor_apply_partials<kSumLists, float>(
      {grads, exp_avg_sq, ams ? max_exp_avg_sq : exp_avg_sq, state_steps}, {}, VHatSumFunctor{beta2, ams},
      partials.data_ptr<double>());
  return partials.sum();  // one fixed-shape reduction: the same order every run
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) {
  m.impl("adamr_step_", &adamr_step_cuda);
  m.impl("adamr_v_hat_sum", &adamr_v_hat_sum_cuda);
}

}  // namespace ntkcl_fast
