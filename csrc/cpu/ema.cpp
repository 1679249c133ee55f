// CPU kernel of ntkcl_fast::ema_update_: one parallel pass over the whole tensor list
// (multi_tensor.h), ema <- lerp(ema, src, 1 - decay) in torch's own form, math in fp32 on
// at::vec::Vectorized (fp64 when a side is fp64), rounded once on store. Minimum traffic: read
// ema and src, write ema, once each; 16-bit values are converted in registers, not through a
// buffer.
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../ema_checks.h"
#include "multi_tensor.h"

namespace ntkcl_fast {
namespace {

using FVec = at::vec::Vectorized<float>;
using DVec = at::vec::Vectorized<double>;

// torch.lerp(a, b, w) as ATen computes it on CPU (Lerp.h, and its vectorized kernel):
// w < 0.5 ? fma(w, b - a, a) : fma(w - 1, b - a, b). The second form is why decay 0 (w = 1)
// copies src exactly, where a + w * (b - a) would be an ulp off a third of the time. The weight
// is one per tensor, so the branch is taken once per chunk: `Lerp` holds its outcome, the
// coefficient and which end is the base, and both forms are one FMA per element.
template <typename Acc>
struct Lerp {
  Acc coeff;
  bool from_ema;

  explicit Lerp(double decay) {
    const Acc w = static_cast<Acc>(1.0 - decay);  // as torch rounds a Python float weight
    from_ema = w < Acc(0.5);
    coeff = from_ema ? w : w - Acc(1);  // exact: w is in [0.5, 1]
  }

  Acc operator()(Acc e, Acc s) const { return std::fma(coeff, s - e, from_ema ? e : s); }

  template <typename V>
  V operator()(const V& e, const V& s) const {
    return at::vec::fmadd(V(coeff), s - e, from_ema ? e : s);
  }
};

// Sixteen elements of p as two float vectors, and back (rounded to T once).
template <typename T>
inline void load16(const T* p, FVec& lo, FVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = FVec::loadu(p);
    hi = FVec::loadu(p + FVec::size());
  } else {
    at::vec::load_to_float<T>(p, lo, hi);
  }
}

template <typename T>
inline void store16(T* p, const FVec& lo, const FVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + FVec::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// ema[0, n) <- lerp(ema, src, w). fp32 math covers every pair without an fp64 side; fp64 with
// fp64 has its own vector loop; the rare pairs mixing fp64 with another dtype run scalar.
template <typename Acc, typename E, typename S>
void lerp_span(E* ema, const S* src, int64_t n, const Lerp<Acc>& lerp) {
  int64_t i = 0;
  if constexpr (std::is_same_v<Acc, float>) {
    static_assert(FVec::size() * 2 == 16, "load16 moves two float vectors");
    for (; i + 16 <= n; i += 16) {
      FVec e0, e1, s0, s1;
      load16(ema + i, e0, e1);
      load16(src + i, s0, s1);
      store16(ema + i, lerp(e0, s0), lerp(e1, s1));
    }
  } else if constexpr (std::is_same_v<E, double> && std::is_same_v<S, double>) {
    for (; i + DVec::size() <= n; i += DVec::size()) {
      lerp(DVec::loadu(ema + i), DVec::loadu(src + i)).store(ema + i);
    }
  }
  for (; i < n; ++i) ema[i] = static_cast<E>(lerp(static_cast<Acc>(ema[i]), static_cast<Acc>(src[i])));
}

// One pair as the chunks see it: raw pointers and dtypes read once per call, not once per chunk
// (a ViT-B list is ~5K chunks, and each Tensor accessor costs a few checks).
struct Pair {
  void* ema;
  const void* src;
  at::ScalarType ema_dtype, src_dtype;
  double decay;
};

// Elements [begin, end) of one pair: the dtypes visited once, then a typed span.
void ema_chunk(const Pair& p, int64_t begin, int64_t end) {
  cpu::visit_float(p.ema_dtype, [&](auto e_tag) {
    cpu::visit_float(p.src_dtype, [&](auto s_tag) {
      using E = decltype(e_tag);
      using S = decltype(s_tag);
      using Acc = std::conditional_t<std::is_same_v<E, double> || std::is_same_v<S, double>, double, float>;
      lerp_span(static_cast<E*>(p.ema) + begin, static_cast<const S*>(p.src) + begin, end - begin, Lerp<Acc>(p.decay));
    });
  });
}

void ema_update_cpu(at::TensorList ema, at::TensorList src, at::ArrayRef<double> decay,
                    const std::optional<at::Tensor>& decay_tensor) {
  check_ema_args(ema, src, decay, decay_tensor, c10::DeviceType::CPU);
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
  const double shared = has_tensor ? decay_tensor->item<double>() : 0.0;
  TORCH_CHECK_VALUE(!has_tensor || (shared >= 0.0 && shared <= 1.0), "decay_tensor must be in [0, 1]");
  const EmaWork work = split_ema_pairs(ema, src, has_tensor ? at::ArrayRef<double>() : decay);
  std::vector<Pair> pairs;
  pairs.reserve(work.ema.size());
  for (size_t t = 0; t < work.ema.size(); ++t) {
    pairs.push_back({work.ema[t].data_ptr(), work.src[t].const_data_ptr(), work.ema[t].scalar_type(),
                     work.src[t].scalar_type(), has_tensor ? shared : work.decay[t]});
  }
  cpu::ChunkPlan(work.ema).parallel_for([&](int64_t, const cpu::Chunk& c) { ema_chunk(pairs[c.tensor], c.begin, c.end); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace ntkcl_fast
