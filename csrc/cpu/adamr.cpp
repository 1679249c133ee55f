// CPU kernel of ntkcl_fast::adamr_step_: one parallel pass over the chunk plan of the parameter
// list (multi_tensor.h). Minimum traffic: read params, grads, both moments and anchors once,
// write params and moments once. Math in fp32 (fp64 when params, grads or moments are fp64).
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../adamr_checks.h"
#include "multi_tensor.h"

namespace ntkcl_fast {
namespace {

using cpu::kTile;

// hyper of the op schema: lr, beta1, beta2, eps, weight_decay, pull, lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t).
struct Hyper {
  double lr, beta1, beta2, eps, wd, pull, step_size, inv_sqrt_bc2;
};

struct AdamRLists {
  at::TensorList params, grads, exp_avg, exp_avg_sq, anchors;
};

template <typename Acc>
void adamr_chunk(const AdamRLists& l, size_t t, int64_t begin, int64_t end, const Hyper& h, bool l1) {
  using V = at::vec::Vectorized<Acc>;
  cpu::WriteTile<Acc> p_tile(l.params[t]), m_tile(l.exp_avg[t]), v_tile(l.exp_avg_sq[t]);
  cpu::ReadTile<Acc> g_tile(l.grads[t]), a_tile(l.anchors[t]);
  const Acc lr = h.lr, b1 = h.beta1, b2 = h.beta2, eps = h.eps, wd = h.wd, pull = h.pull;
  const Acc step_size = h.step_size, inv_sqrt_bc2 = h.inv_sqrt_bc2;
  const V lr_v(lr), b1_v(b1), b2_v(b2), c1_v(1 - b1), c2_v(1 - b2), eps_v(eps), wd_v(wd), pull_v(pull);
  const V step_v(step_size), bc2_v(inv_sqrt_bc2), zero(0), one(1);
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    Acc* p = p_tile.load(pos, n);
    const Acc* g = g_tile.read(pos, n);
    Acc* m = m_tile.load(pos, n);
    Acc* v = v_tile.load(pos, n);
    const Acc* a = a_tile.read(pos, n);
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
    p_tile.store(pos, n);
    m_tile.store(pos, n);
    v_tile.store(pos, n);
  }
}

void adamr_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                    at::TensorList anchors, at::ArrayRef<double> hyper, bool l1) {
  check_adamr_args(params, grads, exp_avg, exp_avg_sq, anchors, hyper, c10::DeviceType::CPU);
  const Hyper h{hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5], hyper[6], hyper[7]};
  const AdamRLists lists{params, grads, exp_avg, exp_avg_sq, anchors};
  cpu::ChunkPlan(params).parallel_for([&](int64_t, const cpu::Chunk& c) {
    cpu::with_acc(cpu::any_double({params, grads, exp_avg}, c.tensor),
                  [&](auto acc) { adamr_chunk<decltype(acc)>(lists, c.tensor, c.begin, c.end, h, l1); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) { m.impl("adamr_step_", &adamr_step_cpu); }

}  // namespace ntkcl_fast
