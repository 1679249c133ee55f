// CPU kernels of the L2 / EWC ops: ntkcl_fast::l2_penalty, l2_penalty_grad_, fisher_accumulate_.
//
// The list is cut into fixed chunks of each tensor (kChunk elements), processed in parallel.
// Each chunk's partial sum lands in its own slot and the slots are added in chunk order, so the
// value does not depend on the thread count: the same inputs give the same bits on every run.
// Element math runs in fp32 (fp64 when a side is fp64) on at::vec::Vectorized over small tiles
// converted from any dtype mix; the per-element terms are summed in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../penalty_checks.h"

#include "tile.h"

namespace ntkcl_fast {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 16384;  // part of the reduction order: never make it depend on threads
constexpr int64_t kTile = 256;

struct Chunk {
  int64_t tensor, begin, end;
};

// Fixed chunks of every non-empty tensor of `list`, in list order.
std::vector<Chunk> chunks_of(at::TensorList list) {
  std::vector<Chunk> out;
  for (size_t t = 0; t < list.size(); ++t) {
    const int64_t n = list[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) out.push_back({static_cast<int64_t>(t), b, std::min(n, b + kChunk)});
  }
  return out;
}

struct L2Args {
  at::TensorList grads, params, anchors, importance;
  double scale, coef;  // coef = 2 * scale * grad_output
  bool accumulate;
};

// Sum of F * (p - a)^2 over [begin, end) of tensor t (without the scale); writes the gradient
// when grads are given.
template <typename Acc>
double l2_chunk(const L2Args& args, int64_t t, int64_t begin, int64_t end) {
  using V = Vectorized<Acc>;
  const bool has_f = !args.importance.empty();
  const bool has_g = !args.grads.empty();
  alignas(64) Acc p[kTile], a[kTile], f[kTile], g[kTile], q[kTile];
  const V coef(static_cast<Acc>(args.coef));
  double sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    load_tile(args.params[t], pos, n, p);
    load_tile(args.anchors[t], pos, n, a);
    if (has_f) load_tile(args.importance[t], pos, n, f);
    if (has_g && args.accumulate) load_tile(args.grads[t], pos, n, g);
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
    if (has_g) store_tile(args.grads[t], pos, n, g);
  }
  return ((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]));
}

bool any_double(at::TensorList a, at::TensorList b, at::TensorList c, at::TensorList d, int64_t t) {
  for (at::TensorList l : {a, b, c, d}) {
    if (!l.empty() && l[t].scalar_type() == at::kDouble) return true;
  }
  return false;
}

at::Tensor l2_run(const L2Args& args) {
  const std::vector<Chunk> chunks = chunks_of(args.params);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      partial[c] = any_double(args.params, args.anchors, args.importance, args.grads, ch.tensor)
                       ? l2_chunk<double>(args, ch.tensor, ch.begin, ch.end)
                       : l2_chunk<float>(args, ch.tensor, ch.begin, ch.end);
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;  // chunk order: deterministic
  return at::scalar_tensor(total * args.scale, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor l2_penalty_cpu(at::TensorList params, at::TensorList anchors, at::TensorList importance, double scale) {
  check_l2_args({}, params, anchors, importance, scale, std::nullopt, c10::DeviceType::CPU);
  return l2_run({{}, params, anchors, importance, scale, 0.0, false});
}

at::Tensor l2_penalty_grad_cpu(at::TensorList grads, at::TensorList params, at::TensorList anchors,
                               at::TensorList importance, double scale, const std::optional<at::Tensor>& grad_output,
                               bool accumulate) {
  check_l2_args(grads, params, anchors, importance, scale, grad_output, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(grads.size() == params.size(), "grads must have one tensor per params");
  const double go = grad_output.has_value() && grad_output->defined() ? grad_output->item<double>() : 1.0;
  return l2_run({grads, params, anchors, importance, scale, 2.0 * scale * go, accumulate});
}

template <typename Acc>
void fisher_chunk(const at::Tensor& fisher, const at::Tensor& grads, int64_t begin, int64_t end, double scale,
                  double decay) {
  using V = Vectorized<Acc>;
  alignas(64) Acc f[kTile], g[kTile];
  const V sv(static_cast<Acc>(scale)), dv(static_cast<Acc>(decay));
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    load_tile(fisher, pos, n, f);
    load_tile(grads, pos, n, g);
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      const V gj = V::loadu(g + j);
      (dv * V::loadu(f + j) + sv * (gj * gj)).store(f + j);
    }
    for (; j < n; ++j) f[j] = static_cast<Acc>(decay) * f[j] + static_cast<Acc>(scale) * (g[j] * g[j]);
    store_tile(fisher, pos, n, f);
  }
}

void fisher_accumulate_cpu(at::TensorList fisher, at::TensorList grads, double scale, double decay) {
  check_fisher_args(fisher, grads, scale, decay, c10::DeviceType::CPU);
  const std::vector<Chunk> chunks = chunks_of(fisher);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& f = fisher[ch.tensor];
      const at::Tensor& g = grads[ch.tensor];
      if (f.scalar_type() == at::kDouble || g.scalar_type() == at::kDouble) {
        fisher_chunk<double>(f, g, ch.begin, ch.end, scale, decay);
      } else {
        fisher_chunk<float>(f, g, ch.begin, ch.end, scale, decay);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) {
  m.impl("l2_penalty", &l2_penalty_cpu);
  m.impl("l2_penalty_grad_", &l2_penalty_grad_cpu);
  m.impl("fisher_accumulate_", &fisher_accumulate_cpu);
}

}  // namespace ntkcl_fast
