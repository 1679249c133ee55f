// CUDA kernels of the L2 / EWC ops: one launch per device for the whole list (plus one tiny
// fixed-order reduction of the per-block partial sums), any mix of fp16/bf16/fp32/fp64 params,
// anchors and importance in that launch. Element math in fp32 (fp64 when a side is fp64); the
// per-element terms are summed in double, per thread, then per block with a fixed tree: no float
// atomics. Minimum traffic: read params, anchors (and importance); the gradient adds reading
// (when accumulating) and writing grads; fisher_accumulate_ reads fisher and grads, writes fisher.
#include <torch/library.h>

#include "../penalty_checks.h"
#include "multi_tensor_apply.cuh"
#include "pack.cuh"

namespace ntkcl_fast {
namespace {

// Table lists: 0 params, 1 anchors, 2 importance (params again when absent), 3 grads (params
// again when absent; grads have the params' dtype). Each thread returns its share of
// sum F * (p - a)^2 over the chunk, summed in double in element order; with grads it also writes
// g <- [g +] coef * F * (p - a).
struct L2Functor {
  bool has_f, has_g, accumulate;
  double coef;                   // 2 * scale (times grad_output when that is not on device)
  const double* grad_output;     // null: 1

  __device__ __forceinline__ double operator()(const mta::Table<4, double>& table, int t, int64_t begin,
                                               int64_t end) const {
    const double coef_d = grad_output ? coef * *grad_output : coef;
    // no importance: F is a dummy of A's type, never loaded
    return mta::visit_dtypes([&](auto p_type, auto a_type, auto f_type) {
      using P = decltype(p_type);
      using A = decltype(a_type);
      using F = decltype(f_type);
      using Acc = mta::AccOf<P, A, F>;
      const Acc c = static_cast<Acc>(coef_d);
      double sum = 0.0;
      const auto op = [&](int64_t, auto lanes, Acc* p, Acc* a, Acc* f, Acc* g) {
#pragma unroll
        for (int k = 0; k < lanes; ++k) {
          const Acc d = p[k] - a[k];
          const Acc fd = has_f ? f[k] * d : d;
          sum += static_cast<double>(fd * d);
          const Acc step = c * fd;
          g[k] = accumulate ? step + g[k] : step;
        }
      };
      P* g = has_g ? mta::list_ptr<P>(table, 3, t) : nullptr;
      mta::for_each_pack<Acc>(begin, end, op, mta::reads(mta::list_ptr<const P>(table, 0, t)),
                              mta::reads(mta::list_ptr<const A>(table, 1, t)),
                              mta::reads(has_f ? mta::list_ptr<const F>(table, 2, t) : nullptr),
                              mta::Operand<P>{g, g && accumulate, g != nullptr});
      return sum;
    }, table.dtype[0][t], table.dtype[1][t], has_f ? table.dtype[2][t] : table.dtype[1][t]);
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
  check_l2_grad_args(grads, params, anchors, importance, scale, grad_output, c10::DeviceType::CUDA);
  return l2_run(grads, params, anchors, importance, scale, grad_output, accumulate);
}

// Table lists: 0 fisher, 1 grads. fisher <- decay * fisher + scale * grads^2.
struct FisherFunctor {
  double scale, decay;

  __device__ __forceinline__ void operator()(const mta::Table<2, double>& table, int t, int64_t begin,
                                             int64_t end) const {
    mta::visit_dtypes([&](auto f_type, auto g_type) {
      using FI = decltype(f_type);
      using GR = decltype(g_type);
      using Acc = mta::AccOf<FI, GR>;
      const Acc s = static_cast<Acc>(scale), dc = static_cast<Acc>(decay);
      const auto op = [&](int64_t, auto lanes, Acc* f, Acc* g) {
#pragma unroll
        for (int k = 0; k < lanes; ++k) f[k] = dc * f[k] + s * (g[k] * g[k]);
      };
      mta::for_each_pack<Acc>(begin, end, op, mta::updates(mta::list_ptr<FI>(table, 0, t)),
                              mta::reads(mta::list_ptr<const GR>(table, 1, t)));
    }, table.dtype[0][t], table.dtype[1][t]);
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
