// CPU multi-tensor layer: a whole tensor list as one index space of fixed chunks for
// at::parallel_for, reductions with one partial sum per chunk added in chunk order, and the math
// type of each tensor tuple. The kernels of ema, dare, penalty and adamr are small per-chunk
// functions over it (tile I/O in tile.h).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "tile.h"

namespace ntkcl_fast {
namespace cpu {

// Elements per chunk. It fixes the order in which penalty values are summed, so it must never
// depend on the thread count; 16K elements (>= 64 KB of traffic) amortize the scheduling.
constexpr int64_t kChunk = 16384;

struct Chunk {
  size_t tensor;
  int64_t begin, end;  // element range of that tensor
};

// Every tensor of a list cut into kChunk-element chunks, numbered in list order. Each tensor of the
// other lists of an op pairs with the same-index tensor of this one, so one plan serves them all.
class ChunkPlan {
 public:
  explicit ChunkPlan(at::TensorList list) : first_(list.size() + 1, 0), numel_(list.size()) {
    for (size_t t = 0; t < list.size(); ++t) {
      numel_[t] = list[t].numel();
      first_[t + 1] = first_[t] + (numel_[t] + kChunk - 1) / kChunk;
      total_ += numel_[t];
    }
  }

  int64_t size() const { return first_.back(); }

  // f(c, chunk) for every chunk c, in parallel; a thread visits its chunks in order. A list of
  // fewer than kSerial elements runs on the calling thread: waking the pool costs more.
  template <typename F>
  void parallel_for(const F& f) const {
    const int64_t grain = total_ < kSerial ? std::max<int64_t>(size(), 1) : 1;
    at::parallel_for(0, size(), grain, [&](int64_t lo, int64_t hi) {
      size_t t = std::upper_bound(first_.begin(), first_.end(), lo) - first_.begin() - 1;  // first_[t] <= lo
      for (int64_t c = lo; c < hi; ++c) {
        while (first_[t + 1] <= c) ++t;
        const int64_t begin = (c - first_[t]) * kChunk;
        f(c, Chunk{t, begin, std::min(numel_[t], begin + kChunk)});
      }
    });
  }

  // Sum over chunks of f(chunk): each chunk's sum in its own slot, the slots added in chunk order,
  // so the result has the same bits at every thread count.
  template <typename F>
  double sum(const F& f) const {
    std::vector<double> partial(size(), 0.0);
    parallel_for([&](int64_t c, const Chunk& chunk) { partial[c] = f(chunk); });
    double total = 0.0;
    for (double v : partial) total += v;
    return total;
  }

 private:
  static constexpr int64_t kSerial = int64_t{1} << 16;

  std::vector<int64_t> first_;  // tensor t owns chunks [first_[t], first_[t + 1])
  std::vector<int64_t> numel_;
  int64_t total_ = 0;
};

// Math in double when any tensor at index t of the (non-empty) lists is fp64, else in float.
inline bool any_double(std::initializer_list<at::TensorList> lists, size_t t) {
  for (at::TensorList l : lists) {
    if (!l.empty() && l[t].scalar_type() == at::kDouble) return true;
  }
  return false;
}

// Calls f(Acc{}) with Acc double or float.
template <typename F>
decltype(auto) with_acc(bool is_double, const F& f) {
  return is_double ? f(double{}) : f(float{});
}

}  // namespace cpu
}  // namespace ntkcl_fast
