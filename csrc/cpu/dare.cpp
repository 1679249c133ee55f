// CPU kernels of ntkcl_fast::dare_, dare_multi_ and magnitude_prune_.
//
// One parallel pass over the chunk plan of the list (multi_tensor.h): each tile draws its Philox
// words into a small stack buffer (dare_draws.h: 16 or 32 counters at a time in AVX2 / AVX-512
// registers), then applies the merge with fp32 math (fp64 for fp64), rounded once on store.
// Nothing is stored but the output. Minimum traffic: read finetuned (and base), write out.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "../dare_checks.h"
#include "dare_draws.h"
#include "multi_tensor.h"

namespace ntkcl_fast {
namespace {

constexpr int64_t kBlock = 256;  // elements per draw buffer, a multiple of 4

struct Job {
  const at::Tensor* out;
  const at::Tensor* finetuned;
  const at::Tensor* base;  // null: delta mode
  double q;
  const at::Tensor* q_rows;  // null: scalar q
  uint64_t key;
  int64_t offset;  // global flat index of element 0 (a shard's place in the whole tensor)
};

// Lane masks of the keep rule, one per element, as wide as Acc: all ones = kept. Integer lanes of
// the value's width let the merge be one vector blend (the compare loop vectorizes on its own).
template <typename Acc>
using KeepMask = std::conditional_t<std::is_same_v<Acc, double>, uint64_t, uint32_t>;

// out[i, e) <- keep ? base + (f - base) / q : base (with base), keep ? f / q : 0 (delta mode).
// Vector lanes compute exactly what the scalar tail computes (IEEE division, one rounding each),
// so every element is bit-identical to the other backends whichever path it takes.
template <typename Acc>
void merge_run(const Acc* f, const Acc* b, const KeepMask<Acc>* keep, Acc q, Acc* out, int64_t i, int64_t e) {
  using V = at::vec::Vectorized<Acc>;
  const V vq(q);
  int64_t x = i;
  for (; x + V::size() <= e; x += V::size()) {
    const V vf = V::loadu(f + x), mask = V::loadu(keep + x);
    if (b) {
      const V vb = V::loadu(b + x);
      V::blendv(vb, vb + (vf - vb) / vq, mask).store(out + x);
    } else {
      V::blendv(V(Acc(0)), vf / vq, mask).store(out + x);
    }
  }
  for (; x < e; ++x) {
    if (b) {
      out[x] = keep[x] ? b[x] + (f[x] - b[x]) / q : b[x];
    } else {
      out[x] = keep[x] ? f[x] / q : Acc(0);
    }
  }
}

// out[begin, end) of one job, begin a multiple of 4 (chunk and tile starts are): per tile, the
// draws into a stack buffer, then the merge in Acc, rounded once on store.
template <typename Acc>
void dare_chunk(const Job& job, int64_t begin, int64_t end, uint64_t threshold, uint64_t seed) {
  static_assert(cpu::kTile == kBlock, "one draw buffer per tile");
  using Mask = KeepMask<Acc>;
  const Acc* qr = job.q_rows ? job.q_rows->const_data_ptr<Acc>() : nullptr;
  const int64_t inner = job.q_rows && job.out->size(0) ? job.out->numel() / job.out->size(0) : 0;
  cpu::WriteTile<Acc> out_tile(*job.out);
  cpu::ReadTile<Acc> f_tile(*job.finetuned);
  std::optional<cpu::ReadTile<Acc>> b_tile;
  if (job.base) b_tile.emplace(*job.base);
  // draws start at the aligned group of pos + offset: `shift` leading words belong to earlier elements
  alignas(64) uint32_t u[kBlock + 4];
  alignas(64) Mask keep[kBlock];
  for (int64_t pos = begin; pos < end; pos += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, end - pos);
    if (threshold == 0) {
      std::fill(keep, keep + n, ~Mask{0});
    } else if (threshold > 0xFFFFFFFFull) {
      std::fill(keep, keep + n, Mask{0});
    } else {
      const int64_t global = pos + job.offset;
      const int64_t shift = global & 3;
      cpu::fill_dare_draws(u, global - shift, n + shift, job.key, seed);
      const uint32_t t32 = static_cast<uint32_t>(threshold);
      for (int64_t i = 0; i < n; ++i) keep[i] = u[shift + i] >= t32 ? ~Mask{0} : Mask{0};
    }
    // read before open: in place, out shares memory with finetuned or base
    const Acc* f = f_tile.read(pos, n);
    const Acc* b = b_tile ? b_tile->read(pos, n) : nullptr;
    Acc* out = out_tile.open(pos);
    for (int64_t i = 0; i < n;) {
      // a run of one q: the whole tile for scalar q, up to the next row boundary otherwise
      int64_t e = n;
      Acc q = static_cast<Acc>(job.q);
      if (qr) {
        const int64_t row = (pos + i) / inner;
        q = qr[row];
        e = std::min(e, (row + 1) * inner - pos);
      }
      merge_run(f, b, keep, q, out, i, e);
      i = e;
    }
    out_tile.store(pos, n);
  }
}

void run_jobs(const std::vector<Job>& jobs, uint64_t threshold, uint64_t seed) {
  std::vector<at::Tensor> outs;
  for (const Job& job : jobs) outs.push_back(*job.out);
  cpu::ChunkPlan(outs).parallel_for([&](int64_t, const cpu::Chunk& c) {
    const Job& job = jobs[c.tensor];
    cpu::with_acc(job.out->scalar_type() == at::kDouble,
                  [&](auto acc) { dare_chunk<decltype(acc)>(job, c.begin, c.end, threshold, seed); });
  });
}

void dare_cpu(const at::Tensor& out, const at::Tensor& finetuned, const std::optional<at::Tensor>& base,
              int64_t threshold, double q, const std::optional<at::Tensor>& q_rows, int64_t seed, int64_t key,
              int64_t offset) {
  const at::Tensor* b = base.has_value() && base->defined() ? &*base : nullptr;
  check_threshold(threshold);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  check_dare_one(out, finetuned, b, q, q_rows, c10::DeviceType::CPU);
  const at::Tensor* qr = q_rows.has_value() && q_rows->defined() ? &*q_rows : nullptr;
  if (qr) {
    TORCH_CHECK_VALUE((*qr > 0).all().item<bool>(), "q_rows must be > 0");
  }
  run_jobs({Job{&out, &finetuned, b, q, qr, static_cast<uint64_t>(key), offset}}, static_cast<uint64_t>(threshold),
           static_cast<uint64_t>(seed));
}

void dare_multi_cpu(at::TensorList out, at::TensorList finetuned, at::TensorList base, int64_t threshold,
                    at::ArrayRef<double> q, int64_t seed, at::ArrayRef<int64_t> keys) {
  check_dare_multi_args(out, finetuned, base, threshold, q, keys, c10::DeviceType::CPU);
  std::vector<Job> jobs;
  for (size_t i = 0; i < out.size(); ++i) {
    jobs.push_back(Job{&out[i], &finetuned[i], &base[i], q[i], nullptr, static_cast<uint64_t>(keys[i]), 0});
  }
  run_jobs(jobs, static_cast<uint64_t>(threshold), static_cast<uint64_t>(seed));
}

// Magnitude order with NaN above every number, as a descending torch.sort ranks it (API.md: NaN
// entries are kept first); all NaNs rank equal. A strict weak order, so nth_element may use it.
template <typename A>
bool ranks_above(A a, A b) {
  return std::isnan(a) ? !std::isnan(b) : a > b;
}

template <typename A>
bool same_rank(A a, A b) {
  return std::isnan(a) ? std::isnan(b) : a == b;
}

// Exact k by selection, not a sort: nth_element finds the k-th ranked magnitude, then the ties at
// that rank are kept in index order until k entries are kept.
template <typename T>
void prune_typed(at::Tensor& delta, int64_t k) {
  T* d = delta.data_ptr<T>();
  const int64_t n = delta.numel();
  if (k >= n) return;
  if (k <= 0) {
    std::fill(d, d + n, T(0));
    return;
  }
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::vector<Acc> mag(n);
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) mag[i] = std::abs(static_cast<Acc>(d[i]));
  });
  std::nth_element(mag.begin(), mag.begin() + (k - 1), mag.end(), ranks_above<Acc>);
  const Acc kth = mag[k - 1];
  int64_t greater = 0;
  for (int64_t i = 0; i < n; ++i) greater += ranks_above(std::abs(static_cast<Acc>(d[i])), kth);
  int64_t room = k - greater;
  for (int64_t i = 0; i < n; ++i) {
    const Acc m = std::abs(static_cast<Acc>(d[i]));
    if (ranks_above(m, kth)) continue;
    if (same_rank(m, kth) && room > 0) {
      --room;
      continue;
    }
    d[i] = T(0);
  }
}

void magnitude_prune_cpu(const at::Tensor& delta, int64_t k) {
  check_float(delta, Arg{"delta"});
  check_writable(delta, Arg{"delta"});
  TORCH_CHECK_VALUE(delta.is_contiguous(), "delta must be contiguous");
  TORCH_CHECK_VALUE(k >= 0 && k <= delta.numel(), "k must be in [0, numel]");
  at::Tensor d = delta;
  cpu::visit_float(delta.scalar_type(), [&](auto v) { prune_typed<decltype(v)>(d, k); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) {
  m.impl("dare_", &dare_cpu);
  m.impl("dare_multi_", &dare_multi_cpu);
  m.impl("magnitude_prune_", &magnitude_prune_cpu);
}

}  // namespace ntkcl_fast
