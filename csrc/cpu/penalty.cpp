// CPU kernels of the L2 / EWC ops: ntkcl_fast::l2_penalty, l2_penalty_grad_, fisher_accumulate_.
//
// One parallel pass over the chunk plan of the list (multi_tensor.h). Each chunk's partial sum
// lands in its own slot and the slots are added in chunk order, so the value does not depend on
// the thread count. Element math in fp32 (fp64 when a side is fp64) on at::vec::Vectorized over
// tiles; the per-element terms are summed in double. Minimum traffic: l2_penalty reads params,
// anchors (and importance); the gradient adds reading (when accumulating) and writing grads;
// fisher_accumulate_ reads fisher and grads and writes fisher.
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../penalty_checks.h"
#include "multi_tensor.h"

namespace ntkcl_fast {
namespace {

using at::vec::Vectorized;
using cpu::kTile;

struct L2Args {
  at::TensorList grads, params, anchors, importance;
  double scale, coef;  // coef = 2 * scale * grad_output
  bool accumulate;
};

// Sum of F * (p - a)^2 over [begin, end) of tensor t (without the scale); writes the gradient
// when grads are given. Eight running sums, added as a tree: part of the fixed reduction order.
// Local tiles rather than cpu::ReadTile / WriteTile: GCC contracts the scalar tail `coef * fd + g` into an FMA
// or not depending on what may alias g, and the local arrays keep the bits the op has always had.
template <typename Acc>
double l2_chunk(const L2Args& args, size_t t, int64_t begin, int64_t end) {
  using V = Vectorized<Acc>;
  const bool has_f = !args.importance.empty();
  const bool has_g = !args.grads.empty();
  alignas(64) Acc p[kTile], a[kTile], f[kTile], g[kTile], q[kTile];
  const V coef(static_cast<Acc>(args.coef));
  double sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    cpu::load_tile(args.params[t], pos, n, p);
    cpu::load_tile(args.anchors[t], pos, n, a);
    if (has_f) cpu::load_tile(args.importance[t], pos, n, f);
    if (has_g && args.accumulate) cpu::load_tile(args.grads[t], pos, n, g);
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      const V d = V::loadu(p + j) - V::loadu(a + j);
      const V fd = has_f ? V::loadu(f + j) * d : d;
      (fd * d).store(q + j);
      if (has_g) {
        const V gv = coef * fd;
        (args.accumulate ? gv + V::loadu(g + j) : gv).store(g + j);
      }
    }
    for (; j < n; ++j) {
      const Acc d = p[j] - a[j];
      const Acc fd = has_f ? f[j] * d : d;
      q[j] = fd * d;
      if (has_g) g[j] = args.accumulate ? static_cast<Acc>(args.coef) * fd + g[j] : static_cast<Acc>(args.coef) * fd;
    }
    for (j = 0; j < n; ++j) sum[j & 7] += static_cast<double>(q[j]);
    if (has_g) cpu::store_tile(args.grads[t], pos, n, g);
  }
  return ((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]));
}

at::Tensor l2_run(const L2Args& args) {
  const double total = cpu::ChunkPlan(args.params).sum([&](const cpu::Chunk& c) {
    const bool dbl = cpu::any_double({args.params, args.anchors, args.importance, args.grads}, c.tensor);
    return cpu::with_acc(dbl, [&](auto acc) { return l2_chunk<decltype(acc)>(args, c.tensor, c.begin, c.end); });
  });
  return at::scalar_tensor(total * args.scale, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor l2_penalty_cpu(at::TensorList params, at::TensorList anchors, at::TensorList importance, double scale) {
  check_l2_args({}, params, anchors, importance, scale, std::nullopt, c10::DeviceType::CPU);
  return l2_run({{}, params, anchors, importance, scale, 0.0, false});
}

at::Tensor l2_penalty_grad_cpu(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                               at::TensorList importance, double scale, const std::optional<at::Tensor>& grad_output,
                               bool accumulate) {
  check_l2_grad_args(grads, params, anchors, importance, scale, grad_output, c10::DeviceType::CPU);
  const double go = grad_output.has_value() && grad_output->defined() ? grad_output->item<double>() : 1.0;
  return l2_run({grads, params, anchors, importance, scale, 2.0 * scale * go, accumulate});
}

// fisher[begin, end) <- decay * fisher + scale * grads^2.
template <typename Acc>
void fisher_chunk(const at::Tensor& fisher, const at::Tensor& grads, int64_t begin, int64_t end, double scale,
                  double decay) {
  using V = Vectorized<Acc>;
  cpu::WriteTile<Acc> f_tile(fisher);
  cpu::ReadTile<Acc> g_tile(grads);
  const V sv(static_cast<Acc>(scale)), dv(static_cast<Acc>(decay));
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    Acc* f = f_tile.load(pos, n);
    const Acc* g = g_tile.read(pos, n);
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      const V gj = V::loadu(g + j);
      at::vec::fmadd(dv, V::loadu(f + j), sv * (gj * gj)).store(f + j);
    }
    // one explicit FMA everywhere, the tail too: left to the compiler, `dc * f + s * g * g` fuses in
    // some loops and not others, so an element's rounding would depend on where its shard starts
    if (j < n) {
      const V gj = V::loadu(g + j, n - j);
      at::vec::fmadd(dv, V::loadu(f + j, n - j), sv * (gj * gj)).store(f + j, n - j);
    }
    f_tile.store(pos, n);
  }
}

void fisher_accumulate_cpu(at::TensorList fisher, at::TensorList grads, double scale, double decay) {
  check_fisher_args(fisher, grads, scale, decay, c10::DeviceType::CPU);
  cpu::ChunkPlan(fisher).parallel_for([&](int64_t, const cpu::Chunk& c) {
    cpu::with_acc(cpu::any_double({fisher, grads}, c.tensor), [&](auto acc) {
      fisher_chunk<decltype(acc)>(fisher[c.tensor], grads[c.tensor], c.begin, c.end, scale, decay);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) {
  m.impl("l2_penalty", &l2_penalty_cpu);
  m.impl("l2_penalty_grad_", &l2_penalty_grad_cpu);
  m.impl("fisher_accumulate_", &fisher_accumulate_cpu);
}

}  // namespace ntkcl_fast
