// CPU kernels of ntkcl_fast::adamr_step_ and ntkcl_fast::adamr_v_hat_sum: one parallel pass over the
// chunk plan of the parameter list each (multi_tensor.h). Minimum traffic of the step: read params,
// grads, the moments and anchors once, write params and moments once; the sum reads grads and the
// second moments. Math in fp32 (fp64 when params, grads or moments are fp64).
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "../adamr_checks.h"
#include "multi_tensor.h"

namespace ntkcl_fast {
namespace {

using cpu::kTile;

struct AdamRLists {
  at::TensorList params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors;
};

// Per-tensor factors of the step t = state_steps[i] + 1, in double, rounded once to the math type.
struct StepFactors {
  double step_size, inv_sqrt_bc2, inv_bc2;
};

StepFactors step_factors(const at::Tensor& state_step, double lr, double beta1, double beta2) {
  const double t = static_cast<double>(*state_step.const_data_ptr<float>()) + 1.0;  // checked: 0-d fp32 on CPU
  const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
  return {lr / bc1, 1.0 / std::sqrt(bc2), 1.0 / bc2};
}

// max that keeps NaN from either side, as torch.maximum (AMSGrad's running max).
template <typename Acc>
Acc max_nan(Acc a, Acc b) {
  return (a > b || a != a) ? a : b;
}

template <typename Acc>
void adamr_chunk(const AdamRLists& l, size_t t, int64_t begin, int64_t end, const AdamRHyper& h, double pull_coef,
                 const StepFactors& f) {
  using V = at::vec::Vectorized<Acc>;
  const bool ams = !l.max_exp_avg_sq.empty();
  cpu::WriteTile<Acc> p_tile(l.params[t]), m_tile(l.exp_avg[t]), v_tile(l.exp_avg_sq[t]);
  std::optional<cpu::WriteTile<Acc>> vm_tile;
  if (ams) vm_tile.emplace(l.max_exp_avg_sq[t]);
  cpu::ReadTile<Acc> g_tile(l.grads[t]), a_tile(l.anchors[t]);
  const Acc b1 = h.beta1, b2 = h.beta2, eps = h.eps, decay = h.lr * h.weight_decay, coef = pull_coef;
  const Acc step_size = f.step_size, inv_sqrt_bc2 = f.inv_sqrt_bc2;
  const V b1_v(b1), b2_v(b2), c1_v(1 - b1), c2_v(1 - b2), eps_v(eps), decay_v(decay), coef_v(coef);
  const V step_v(step_size), bc2_v(inv_sqrt_bc2), zero(0), one(1);
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    Acc* p = p_tile.load(pos, n);
    const Acc* g = g_tile.read(pos, n);
    Acc* m = m_tile.load(pos, n);
    Acc* v = v_tile.load(pos, n);
    Acc* vm = ams ? vm_tile->load(pos, n) : nullptr;
    const Acc* a = a_tile.read(pos, n);
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      const V gj = V::loadu(g + j);
      V pj = V::loadu(p + j);
      const V mj = b1_v * V::loadu(m + j) + c1_v * gj;
      const V vj = b2_v * V::loadu(v + j) + c2_v * gj * gj;
      V den = vj;
      if (ams) {
        den = at::vec::maximum(V::loadu(vm + j), vj);
        den.store(vm + j);
      }
      V diff = pj - V::loadu(a + j);
      if (h.l1) diff = V::blendv(zero, one, diff > zero) - V::blendv(zero, one, diff < zero);
      pj = pj - decay_v * pj - coef_v * diff;
      pj = pj - step_v * mj / (den.sqrt() * bc2_v + eps_v);
      mj.store(m + j);
      vj.store(v + j);
      pj.store(p + j);
    }
    for (; j < n; ++j) {
      const Acc gj = g[j];
      const Acc mj = b1 * m[j] + (1 - b1) * gj;
      const Acc vj = b2 * v[j] + (1 - b2) * gj * gj;
      Acc den = vj;
      if (ams) den = vm[j] = max_nan(vm[j], vj);
      Acc diff = p[j] - a[j];
      if (h.l1) diff = static_cast<Acc>((diff > 0) - (diff < 0));
      Acc pj = p[j] - decay * p[j] - coef * diff;
      pj = pj - step_size * mj / (std::sqrt(den) * inv_sqrt_bc2 + eps);
      m[j] = mj;
      v[j] = vj;
      p[j] = pj;
    }
    p_tile.store(pos, n);
    m_tile.store(pos, n);
    v_tile.store(pos, n);
    if (ams) vm_tile->store(pos, n);
  }
}

// Sum over [begin, end) of tensor t of the new second moment (its running max with AMSGrad), before
// the bias correction. Nothing is written: tiles are read in place when they hold Acc, and each
// vector lane keeps its own double sum (lanes added as a tree at the end), a fixed order.
template <typename Acc>
double v_sum_chunk(at::TensorList grads, at::TensorList exp_avg_sq, at::TensorList max_exp_avg_sq, size_t t,
                   int64_t begin, int64_t end, double beta2) {
  using V = at::vec::Vectorized<Acc>;
  constexpr int kL = V::size();
  const bool ams = !max_exp_avg_sq.empty();
  cpu::ReadTile<Acc> g_tile(grads[t]), v_tile(exp_avg_sq[t]);
  std::optional<cpu::ReadTile<Acc>> vm_tile;
  if (ams) vm_tile.emplace(max_exp_avg_sq[t]);
  const Acc b2 = beta2;
  const V b2_v(b2), c2_v(1 - b2);
  alignas(64) Acc lanes[kL];
  double sum[kL] = {};
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    const Acc* g = g_tile.read(pos, n);
    const Acc* v = v_tile.read(pos, n);
    const Acc* vm = ams ? vm_tile->read(pos, n) : nullptr;
    int64_t j = 0;
    for (; j + kL <= n; j += kL) {
      const V gj = V::loadu(g + j);
      V vj = b2_v * V::loadu(v + j) + c2_v * gj * gj;
      if (ams) vj = at::vec::maximum(V::loadu(vm + j), vj);
      vj.store(lanes);
      for (int l = 0; l < kL; ++l) sum[l] += static_cast<double>(lanes[l]);
    }
    for (; j < n; ++j) {
      const Acc vj = b2 * v[j] + (1 - b2) * g[j] * g[j];
      sum[j % kL] += static_cast<double>(ams ? max_nan(vm[j], vj) : vj);
    }
  }
  for (int width = kL / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) sum[l] += sum[l + width];
  }
  return sum[0];
}

void adamr_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList max_exp_avg_sq, at::TensorList anchors, at::TensorList state_steps,
                    const std::optional<at::Tensor>& v_mean, double lr, double beta1, double beta2, double eps,
                    double weight_decay, double pull, bool l1) {
  const AdamRHyper h{lr, beta1, beta2, eps, weight_decay, pull, l1};
  check_adamr_step_args(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors, state_steps, v_mean, h,
                        c10::DeviceType::CPU);
  double pull_coef = pull * lr;
  if (v_mean.has_value() && v_mean->defined()) {
    const double v = v_mean->item<double>();
    pull_coef = v == 0.0 ? pull_coef : pull_coef / std::sqrt(v);
  }
  std::vector<StepFactors> factors;
  factors.reserve(params.size());
  for (const at::Tensor& s : state_steps) factors.push_back(step_factors(s, lr, beta1, beta2));
  const AdamRLists lists{params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, anchors};
  cpu::ChunkPlan(params).parallel_for([&](int64_t, const cpu::Chunk& c) {
    cpu::with_acc(cpu::any_double({params, grads, exp_avg}, c.tensor), [&](auto acc) {
      adamr_chunk<decltype(acc)>(lists, c.tensor, c.begin, c.end, h, pull_coef, factors[c.tensor]);
    });
  });
  // in place without a dispatch per tensor (152 add_ calls cost more than a small model's step);
  // the version counters are bumped by the op's ADInplaceOrView kernel
  for (const at::Tensor& s : state_steps) *s.data_ptr<float>() += 1.0f;
}

at::Tensor adamr_v_hat_sum_cpu(at::TensorList grads, at::TensorList exp_avg_sq, at::TensorList max_exp_avg_sq,
                               at::TensorList state_steps, double beta2) {
  check_adamr_v_hat_sum_args(grads, exp_avg_sq, max_exp_avg_sq, state_steps, beta2, c10::DeviceType::CPU);
  std::vector<double> inv_bc2;
  inv_bc2.reserve(grads.size());
  for (const at::Tensor& s : state_steps) inv_bc2.push_back(step_factors(s, 0.0, 0.0, beta2).inv_bc2);
  const double total = cpu::ChunkPlan(grads).sum([&](const cpu::Chunk& c) {
    return cpu::with_acc(cpu::any_double({grads, exp_avg_sq}, c.tensor), [&](auto acc) {
      return v_sum_chunk<decltype(acc)>(grads, exp_avg_sq, max_exp_avg_sq, c.tensor, c.begin, c.end, beta2) *
             inv_bc2[c.tensor];
    });
  });
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) {
  m.impl("adamr_step_", &adamr_step_cpu);
  m.impl("adamr_v_hat_sum", &adamr_v_hat_sum_cpu);
}

}  // namespace ntkcl_fast
