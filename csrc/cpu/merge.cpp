// CPU kernel of ntkcl_fast::merge_tensors: mergekit's merge methods on one tensor (docs/API.md,
// "Model merging"), fused.
//
// The output is written in one pass over a fixed chunk plan: per 256-element tile, the base and
// each model are read once (converted to fp32, fp64 for fp64), each model's delta sparsified,
// weighted and mixed with the TIES election in registers and small buffers, and the result
// rounded once on store: (N + 2) x dtype bytes of traffic per element. Statistics come first,
// from extra read passes that write nothing: ties' magnitude thresholds by a radix select over
// the bits of |d_i| (11-bit digits: three counting passes for fp32, six for fp64, plus one when
// ties at the threshold must be split by index), and rescale="l1"'s norms with a fixed-order
// reduction. Counts are exact and sums follow the chunk plan, so every thread count gives the
// same bits; sums over models are left folds in model order, as in reference/merge.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../merge_checks.h"
#include "dare_draws.h"
#include "multi_tensor.h"

namespace ntkcl_fast {
namespace {

constexpr int64_t kTile = cpu::kTile;
// 11-bit digits, four interleaved copies of each histogram (64 KB of int64 counts per model):
// measured against 8-bit digits (one more pass, all in L1) and single 11- or 16-bit histograms,
// this was fastest (bench/NOTES.md, "merge_tensors on CPU: the election and the select")
constexpr int kDigitBits = 11;
constexpr int64_t kBins = int64_t{1} << kDigitBits;
constexpr int64_t kCopies = 4;
constexpr int kLanes = 16;  // partial sums per tile of the l1 norms

// |d| as an unsigned integer whose order is the magnitude order, NaN above +inf (all NaNs one
// key, so they tie and go by index, as in a stable descending sort).
template <typename Acc>
using Key = std::conditional_t<std::is_same_v<Acc, double>, uint64_t, uint32_t>;

template <typename Acc>
inline Key<Acc> magnitude_key(Acc d) {
  using K = Key<Acc>;
  constexpr K kInf = static_cast<K>(std::is_same_v<Acc, double> ? 0x7FF0000000000000ull : 0x7F800000ull);
  K k;
  std::memcpy(&k, &d, sizeof k);
  k &= ~(K{1} << (8 * sizeof(K) - 1));
  return k > kInf ? kInf + 1 : k;
}

enum class Keep { kAll, kNone, kMagnitude, kRandom };

// How model i's delta becomes t_i: which entries are kept, then how kept entries are rescaled.
template <typename Acc>
struct ModelPlan {
  Acc weight = 1;
  Keep keep = Keep::kAll;
  // kMagnitude: keep key > threshold, and the first `room` entries (by index) with key == threshold
  Key<Acc> threshold = 0;
  int64_t room = 0;
  bool all_ties = true;              // room covers every tie: keep key >= threshold
  std::vector<int64_t> ties_before;  // per chunk, ties in earlier chunks (when !all_ties)
  // kRandom: the DARE keep rule, u >= draw_threshold under key
  uint64_t key = 0;
  uint32_t draw_threshold = 0;
  bool divide = false;  // kept / density
  Acc density = 1;
  bool multiply = false;  // kept * scale (l1)
  Acc scale = 1;
};

// t[0, n) <- model p's sparsified, rescaled delta at flat [pos, pos + n) from its delta d; DARE
// draws the global index `offset` + pos + j. `seen`: ties at the threshold met so far in this
// chunk's order (starts at ties_before).
template <typename Acc>
void sparsify_tile(const ModelPlan<Acc>& p, const Acc* d, int64_t pos, int64_t n, uint64_t seed, int64_t offset,
                   int64_t& seen, Acc* t) {
  using Mask = Key<Acc>;
  alignas(64) Mask keep[kTile];
  if (p.keep == Keep::kRandom) {
    // draws start at the aligned group of the global index: `shift` leading words are earlier elements'
    alignas(64) uint32_t u[kTile + 4];
    const int64_t global = pos + offset, shift = global & 3;
    cpu::fill_dare_draws(u, global - shift, n + shift, p.key, seed);
    for (int64_t j = 0; j < n; ++j) keep[j] = u[shift + j] >= p.draw_threshold ? ~Mask{0} : Mask{0};
  } else if (p.keep == Keep::kMagnitude) {
    const Key<Acc> th = p.threshold;
    if (p.all_ties) {
      for (int64_t j = 0; j < n; ++j) keep[j] = magnitude_key(d[j]) >= th ? ~Mask{0} : Mask{0};
    } else {
      for (int64_t j = 0; j < n; ++j) keep[j] = magnitude_key(d[j]) > th ? ~Mask{0} : Mask{0};
      for (int64_t j = 0; j < n; ++j) {  // the ties, in index order, while room lasts
        if (magnitude_key(d[j]) == th) keep[j] = seen++ < p.room ? ~Mask{0} : Mask{0};
      }
    }
  } else {
    std::fill(keep, keep + n, p.keep == Keep::kAll ? ~Mask{0} : Mask{0});
  }
  for (int64_t j = 0; j < n; ++j) t[j] = keep[j] ? d[j] : Acc(0);
  if (p.divide) {
    for (int64_t j = 0; j < n; ++j) t[j] = t[j] / p.density;
  } else if (p.multiply) {
    for (int64_t j = 0; j < n; ++j) t[j] = t[j] * p.scale;
  }
}

// f(chunk index, model slot s, flat start, n, d) for every tile of every chunk and every model
// models[which[s]], d its delta m - b in Acc. Within a chunk, tiles come in order.
template <typename Acc, typename F>
void for_deltas(const cpu::ChunkPlan& chunks, const at::Tensor& base, at::TensorList models,
                const std::vector<size_t>& which, const F& f) {
  chunks.parallel_for([&](int64_t c, const cpu::Chunk& chunk) {
    cpu::ReadTile<Acc> b_tile(base);
    std::vector<cpu::ReadTile<Acc>> m_tiles;
    m_tiles.reserve(which.size());
    for (size_t i : which) m_tiles.emplace_back(models[i]);
    alignas(64) Acc d[kTile];
    for (int64_t pos = chunk.begin; pos < chunk.end; pos += kTile) {
      const int64_t n = std::min<int64_t>(kTile, chunk.end - pos);
      const Acc* b = b_tile.read(pos, n);
      for (size_t s = 0; s < which.size(); ++s) {
        const Acc* m = m_tiles[s].read(pos, n);
        for (int64_t j = 0; j < n; ++j) d[j] = m[j] - b[j];
        f(c, s, pos, n, d);
      }
    }
  });
}

// Per model of `which`, the k-th largest magnitude key (k = ks[s] in [1, numel)), the count of
// keys above it and how many ties at it to keep: one counting pass per digit, the digit
// of the k-th key found from the top, then only keys with that prefix counted at the next one.
template <typename Acc>
void select_thresholds(const cpu::ChunkPlan& chunks, const at::Tensor& base, at::TensorList models,
                       const std::vector<size_t>& which, const std::vector<int64_t>& ks,
                       std::vector<ModelPlan<Acc>>& plans) {
  using K = Key<Acc>;
  constexpr int kKeyBits = 8 * sizeof(K);
  const size_t sel = which.size();
  std::vector<K> prefix(sel, 0);
  std::vector<int64_t> need(ks), ties(sel, 0);
  constexpr int kLevels = (kKeyBits + kDigitBits - 1) / kDigitBits;
  for (int level = 0; level < kLevels; ++level) {
    // digits from the top; the last one takes the bits left over (10 for fp32, 9 for fp64)
    const int width = std::min(kDigitBits, kKeyBits - kDigitBits * level);
    const int shift = kKeyBits - kDigitBits * level - width;
    const K mask = (K{1} << width) - 1;
    // one histogram per thread: counts are exact, so how work splits cannot change them
    std::vector<std::vector<int64_t>> hist(at::get_num_threads());
    for_deltas<Acc>(chunks, base, models, which, [&](int64_t, size_t s, int64_t, int64_t n, const Acc* d) {
      std::vector<int64_t>& h = hist[at::get_thread_num()];
      if (h.empty()) h.assign(sel * kCopies * kBins, 0);
      int64_t* hs = h.data() + s * kCopies * kBins;
      // kCopies interleaved histograms and no branch: neighbours landing in one bin (most of
      // them, at the top digit of similar magnitudes) would otherwise wait on each other's
      // increment, and a prefix test that passes for a fraction of keys would mispredict
      for (int64_t j = 0; j < n; ++j) {
        const K k = magnitude_key(d[j]);
        const bool counted = level == 0 || (k >> (shift + width)) == prefix[s];
        hs[(j % kCopies) * kBins + ((k >> shift) & mask)] += counted;
      }
    });
    std::vector<int64_t> total(sel * kBins, 0);
    for (const auto& h : hist) {
      for (size_t b = 0; b < h.size(); ++b) total[(b / (kCopies * kBins)) * kBins + b % kBins] += h[b];
    }
    for (size_t s = 0; s < sel; ++s) {
      const int64_t* hs = total.data() + s * kBins;
      int64_t digit = static_cast<int64_t>(mask), above = 0;
      for (; digit > 0 && above + hs[digit] < need[s]; --digit) above += hs[digit];
      need[s] -= above;
      ties[s] = hs[digit];
      prefix[s] = (level == 0 ? K{0} : prefix[s] << width) | static_cast<K>(digit);
    }
  }
  std::vector<size_t> split;  // slots whose ties are kept only in part
  for (size_t s = 0; s < sel; ++s) {
    ModelPlan<Acc>& p = plans[which[s]];
    p.threshold = prefix[s];
    p.room = need[s];
    p.all_ties = need[s] == ties[s];
    if (!p.all_ties) split.push_back(s);
  }
  if (split.empty()) return;
  // ties per chunk, then an exclusive scan in chunk order: where each chunk's ties start
  std::vector<size_t> split_models;
  for (size_t s : split) split_models.push_back(which[s]);
  const int64_t n_chunks = chunks.size();
  std::vector<int64_t> counts(n_chunks * split.size(), 0);
  for_deltas<Acc>(chunks, base, models, split_models, [&](int64_t c, size_t s, int64_t, int64_t n, const Acc* d) {
    const K th = plans[split_models[s]].threshold;
    int64_t eq = 0;
    for (int64_t j = 0; j < n; ++j) eq += magnitude_key(d[j]) == th;
    counts[c * split.size() + s] += eq;
  });
  for (size_t s = 0; s < split.size(); ++s) {
    std::vector<int64_t>& before = plans[split_models[s]].ties_before;
    before.assign(n_chunks, 0);
    int64_t running = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      before[c] = running;
      running += counts[c * split.size() + s];
    }
  }
}

// rescale="l1": scale_i = ||d_i||_1 / ||kept d_i||_1 (1 when either is below 1e-7; a NaN norm
// is not below it and scales by NaN, as in mergekit and reference.dare.l1_rescaled). Per tile,
// kLanes interleaved partial sums in fp64 added in lane order; tiles in chunk order, chunks in
// plan order: one summation order at every thread count.
template <typename Acc>
void l1_scales(const cpu::ChunkPlan& chunks, const at::Tensor& base, at::TensorList models,
               const std::vector<size_t>& which, uint64_t seed, int64_t offset, std::vector<ModelPlan<Acc>>& plans) {
  const size_t sel = which.size();
  std::vector<double> full(chunks.size() * sel, 0.0), part(chunks.size() * sel, 0.0);
  for_deltas<Acc>(chunks, base, models, which, [&](int64_t c, size_t s, int64_t pos, int64_t n, const Acc* d) {
    alignas(64) Acc t[kTile];
    int64_t no_ties = 0;
    sparsify_tile(plans[which[s]], d, pos, n, seed, offset, no_ties, t);  // keep only: not rescaled yet
    double lane_full[kLanes] = {}, lane_part[kLanes] = {};
    for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
      const int64_t m = std::min<int64_t>(kLanes, n - j0);
      for (int64_t l = 0; l < m; ++l) {
        lane_full[l] += std::abs(static_cast<double>(d[j0 + l]));
        lane_part[l] += std::abs(static_cast<double>(t[j0 + l]));
      }
    }
    double tf = 0.0, tp = 0.0;
    for (int l = 0; l < kLanes; ++l) {
      tf += lane_full[l];
      tp += lane_part[l];
    }
    full[c * sel + s] += tf;
    part[c * sel + s] += tp;
  });
  for (size_t s = 0; s < sel; ++s) {
    double f = 0.0, k = 0.0;
    for (int64_t c = 0; c < chunks.size(); ++c) {
      f += full[c * sel + s];
      k += part[c * sel + s];
    }
    ModelPlan<Acc>& p = plans[which[s]];
    const Acc fa = static_cast<Acc>(f), ka = static_cast<Acc>(k);
    if (!(fa < Acc(1e-7) || ka < Acc(1e-7))) {
      p.multiply = true;
      p.scale = fa / ka;
    }
  }
}

struct Mix {
  bool linear, consensus, normalize;
};

// out[0, n) from the weighted terms e (model i's at e + i * kTile): the election, the mix, the
// divisor, lambda. `divisor` is the guarded sum of weights when every model takes part.
template <typename Acc>
void mix_tile(const Acc* e, const Acc* w, size_t n_models, const Acc* b, int64_t n, const Mix& how,
                                Acc divisor, Acc lam, Acc* out) {
  alignas(64) Acc mixed[kTile];
  std::fill(mixed, mixed + n, Acc(0));
  if (!how.consensus) {
    for (size_t i = 0; i < n_models; ++i) {
      const Acc* ei = e + i * kTile;
      for (int64_t j = 0; j < n; ++j) mixed[j] += ei[j];
    }
    if (how.normalize) {
      for (int64_t j = 0; j < n; ++j) mixed[j] = mixed[j] / divisor;
    }
  } else {
    alignas(64) Acc sum[kTile], div[kTile];
    std::fill(sum, sum + n, Acc(0));
    std::fill(div, div + n, Acc(0));
    for (size_t i = 0; i < n_models; ++i) {
      const Acc* ei = e + i * kTile;
      for (int64_t j = 0; j < n; ++j) sum[j] += ei[j];
    }
    for (size_t i = 0; i < n_models; ++i) {
      const Acc* ei = e + i * kTile;
      const Acc wi = w[i];
      // at::vec masks and blends: GCC kept the scalar form (a select on the elected sign) a loop
      // of branches, which the random signs mispredict (~8 ns per element for two models)
      using V = at::vec::Vectorized<Acc>;
      const V zero(Acc(0)), wv(wi);
      int64_t j = 0;
      for (; j + V::size() <= n; j += V::size()) {
        const V x = V::loadu(ei + j);
        // zeros and NaN never take part: both comparisons are false for them
        const V take = V::blendv(x < zero, x > zero, V::loadu(sum + j) >= zero);
        (V::loadu(mixed + j) + V::blendv(zero, x, take)).store(mixed + j);
        (V::loadu(div + j) + V::blendv(zero, wv, take)).store(div + j);
      }
      for (; j < n; ++j) {
        const bool take = sum[j] >= 0 ? ei[j] > 0 : ei[j] < 0;
        mixed[j] += take ? ei[j] : Acc(0);
        div[j] += take ? wi : Acc(0);
      }
    }
    if (how.normalize) {
      for (int64_t j = 0; j < n; ++j) mixed[j] = mixed[j] / (div[j] == 0 ? Acc(1) : div[j]);
    }
  }
  if (how.linear) {
    std::copy(mixed, mixed + n, out);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = b[j] + lam * mixed[j];
  }
}

template <typename Acc>
void weigh(const Acc* t, Acc w, int64_t n, Acc* e) {
  for (int64_t j = 0; j < n; ++j) e[j] = t[j] * w;
}

template <typename Acc>
void run_merge(const MergeCall& a, const at::Tensor& out) {
  const size_t n_models = a.models.size();
  const int64_t numel = out.numel();
  const cpu::ChunkPlan chunks{at::TensorList(out)};
  std::vector<ModelPlan<Acc>> plans(n_models);
  std::vector<size_t> select, l1;
  std::vector<int64_t> ks;
  for (size_t i = 0; i < n_models; ++i) {
    ModelPlan<Acc>& p = plans[i];
    const double r = a.densities[i];
    p.weight = static_cast<Acc>(a.weights[i]);
    if (a.method.sparsify == Sparsify::kMagnitude && r < 1.0) {
      const int64_t k = static_cast<int64_t>(r * static_cast<double>(numel));  // floor, as int(r * numel)
      p.keep = k <= 0 ? Keep::kNone : k >= numel ? Keep::kAll : Keep::kMagnitude;
      if (p.keep == Keep::kMagnitude) {
        select.push_back(i);
        ks.push_back(k);
      }
    } else if (a.method.sparsify == Sparsify::kRandom) {
      const uint64_t th = std::min<uint64_t>(static_cast<uint64_t>((1.0 - r) * 4294967296.0), uint64_t{1} << 32);
      p.keep = th == 0 ? Keep::kAll : th >> 32 ? Keep::kNone : Keep::kRandom;
      p.draw_threshold = static_cast<uint32_t>(th);
      p.key = a.key + i;  // mod 2^64
      if (a.rescale == Rescale::kL1) l1.push_back(i);
      p.divide = a.rescale == Rescale::kDensity && r > 0.0;
      p.density = static_cast<Acc>(r);
    }
  }
  if (!select.empty()) select_thresholds(chunks, *a.base, a.models, select, ks, plans);
  if (!l1.empty()) l1_scales(chunks, *a.base, a.models, l1, a.seed, a.offset, plans);

  std::vector<Acc> w(n_models);
  Acc divisor = 0;
  for (size_t i = 0; i < n_models; ++i) {
    w[i] = plans[i].weight;
    divisor += w[i];
  }
  if (std::abs(divisor) < Acc(1e-8)) divisor = 1;
  const Mix how{a.method.linear, a.method.consensus, a.normalize};
  const Acc lam = static_cast<Acc>(a.lam);
  chunks.parallel_for([&](int64_t c, const cpu::Chunk& chunk) {
    std::optional<cpu::ReadTile<Acc>> b_tile;
    if (!how.linear) b_tile.emplace(*a.base);
    std::vector<cpu::ReadTile<Acc>> m_tiles;
    m_tiles.reserve(n_models);
    for (const at::Tensor& m : a.models) m_tiles.emplace_back(m);
    std::vector<int64_t> seen(n_models, 0);
    for (size_t i = 0; i < n_models; ++i) {
      if (!plans[i].all_ties) seen[i] = plans[i].ties_before[c];
    }
    std::vector<Acc> e(n_models * kTile);
    cpu::WriteTile<Acc> out_tile(out);
    alignas(64) Acc d[kTile], t[kTile];
    for (int64_t pos = chunk.begin; pos < chunk.end; pos += kTile) {
      const int64_t n = std::min<int64_t>(kTile, chunk.end - pos);
      const Acc* b = b_tile ? b_tile->read(pos, n) : nullptr;
      for (size_t i = 0; i < n_models; ++i) {
        const Acc* m = m_tiles[i].read(pos, n);
        if (how.linear) {
          weigh(m, w[i], n, e.data() + i * kTile);
          continue;
        }
        for (int64_t j = 0; j < n; ++j) d[j] = m[j] - b[j];
        sparsify_tile(plans[i], d, pos, n, a.seed, a.offset, seen[i], t);
        weigh(t, w[i], n, e.data() + i * kTile);
      }
      mix_tile(e.data(), w.data(), n_models, b, n, how, divisor, lam, out_tile.open(pos));
      out_tile.store(pos, n);
    }
  });
}

void run(const MergeCall& a, const at::Tensor& out) {
  cpu::with_acc(out.scalar_type() == at::kDouble, [&](auto acc) { run_merge<decltype(acc)>(a, out); });
}

using CpuOps = MergeOps<c10::DeviceType::CPU, run>;

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) {
  m.impl("merge_tensors", &CpuOps::fresh);
  m.impl("merge_tensors_into_", &CpuOps::into);
}

}  // namespace ntkcl_fast
