// CPU kernel of ntkcl_fast::adamr_step_: one parallel pass over the whole parameter list, reading
// each of params, grads, moments and anchors once and writing params and moments once.
// Math in fp32 (fp64 when params, grads or moments are fp64) on small converted tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../penalty_checks.h"

#include "tile.h"

namespace ntkcl_fast {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int64_t kTile = 256;

struct Hyper {
  double lr, beta1, beta2, eps, wd, pull, step_size, inv_sqrt_bc2;
};

template <typename Acc>
void adamr_span(const at::Tensor& p_t, const at::Tensor& g_t, const at::Tensor& m_t, const at::Tensor& v_t,
                const at::Tensor& a_t, int64_t begin, int64_t end, const Hyper& h, bool l1) {
  using V = at::vec::Vectorized<Acc>;
  alignas(64) Acc p[kTile], g[kTile], m[kTile], v[kTile], a[kTile];
  const Acc lr = h.lr, b1 = h.beta1, b2 = h.beta2, eps = h.eps, wd = h.wd, pull = h.pull;
  const Acc step_size = h.step_size, inv_sqrt_bc2 = h.inv_sqrt_bc2;
  const V lr_v(lr), b1_v(b1), b2_v(b2), c1_v(1 - b1), c2_v(1 - b2), eps_v(eps), wd_v(wd), pull_v(pull);
  const V step_v(step_size), bc2_v(inv_sqrt_bc2), zero(0), one(1);
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    load_tile(p_t, pos, n, p);
    load_tile(g_t, pos, n, g);
    load_tile(m_t, pos, n, m);
    load_tile(v_t, pos, n, v);
    load_tile(a_t, pos, n, a);
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      const V gj = V::loadu(g + j);
      V pj = V::loadu(p + j);
      const V mj = b1_v * V::loadu(m + j) + c1_v * gj;
      const V vj = b2_v * V::loadu(v + j) + c2_v * gj * gj;
      V diff = pj - V::loadu(a + j);
      if (l1) diff = V::blendv(zero, one, diff > zero) - V::blendv(zero, one, diff < zero);
      pj = pj - lr_v * (wd_v * pj + pull_v * diff);
      pj = pj - step_v * mj / (vj.sqrt() * bc2_v + eps_v);
      mj.store(m + j);
      vj.store(v + j);
      pj.store(p + j);
    }
    for (; j < n; ++j) {
      const Acc gj = g[j];
      const Acc mj = b1 * m[j] + (1 - b1) * gj;
      const Acc vj = b2 * v[j] + (1 - b2) * gj * gj;
      Acc diff = p[j] - a[j];
      if (l1) diff = static_cast<Acc>((diff > 0) - (diff < 0));
      Acc pj = p[j] - lr * (wd * p[j] + pull * diff);
      pj = pj - step_size * mj / (std::sqrt(vj) * inv_sqrt_bc2 + eps);
      m[j] = mj;
      v[j] = vj;
      p[j] = pj;
    }
    store_tile(p_t, pos, n, p);
    store_tile(m_t, pos, n, m);
    store_tile(v_t, pos, n, v);
  }
}

void adamr_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList anchors, at::ArrayRef<double> hyper, bool l1) {
  const auto cpu = c10::DeviceType::CPU;
  check_same_list(params, "params", params, "params", cpu);
  check_same_list(params, "params", grads, "grads", cpu);
  check_same_list(params, "params", exp_avg, "exp_avg", cpu);
  check_same_list(params, "params", exp_avg_sq, "exp_avg_sq", cpu);
  check_same_list(params, "params", anchors, "anchors", cpu);
  TORCH_CHECK_VALUE(hyper.size() == 8, "hyper must hold 8 values, got ", hyper.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(exp_avg[i].scalar_type() == exp_avg_sq[i].scalar_type(), "exp_avg[", i,
                     "] and exp_avg_sq[", i, "] must share a dtype");
  }
  const Hyper h{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6], hyper[7]};
  struct Chunk {
    size_t t;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const size_t t = ch.t;
      const bool dbl = params[t].scalar_type() == at::kDouble || grads[t].scalar_type() == at::kDouble ||
                       exp_avg[t].scalar_type() == at::kDouble;
      if (dbl) {
        adamr_span<double>(params[t], grads[t], exp_avg[t], exp_avg_sq[t], anchors[t], ch.begin, ch.end, h, l1);
      } else {
        adamr_span<float>(params[t], grads[t], exp_avg[t], exp_avg_sq[t], anchors[t], ch.begin, ch.end, h, l1);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) { m.impl("adamr_step_", &adamr_step_cpu); }

}  // namespace ntkcl_fast
