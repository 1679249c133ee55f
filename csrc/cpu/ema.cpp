// CPU kernel of ntkcl_fast::ema_update_: one parallel pass over the whole tensor list.
//
// The list is treated as one long index space, split into equal grains for at::parallel_for,
// so a model of many small tensors balances across threads as well as one big tensor.
// Math runs in fp32 on at::vec::Vectorized (fp64 when a side is fp64), rounded once on store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ema_checks.h"

namespace ntkcl_fast {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

template <typename T>
inline void load_two(const T* p, FVec& lo, FVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = FVec::loadu(p);
    hi = FVec::loadu(p + FVec::size());
  } else {
    at::vec::load_to_float<T>(p, lo, hi);
  }
}

template <typename T>
inline void store_two(T* p, const FVec& lo, const FVec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + FVec::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// ema[0, n) <- ema + w * (src - ema), w = 1 - decay.
template <typename E, typename S>
void ema_span(E* ema, const S* src, int64_t n, double w) {
  constexpr bool kDouble = std::is_same_v<E, double> || std::is_same_v<S, double>;
  using Acc = std::conditional_t<kDouble, double, float>;
  int64_t i = 0;
  if constexpr (!kDouble) {
    constexpr int64_t kStep = 2 * FVec::size();
    const FVec wv(static_cast<float>(w));
    for (; i + kStep <= n; i += kStep) {
      FVec e0, e1, s0, s1;
      load_two(ema + i, e0, e1);
      load_two(src + i, s0, s1);
      store_two(ema + i, at::vec::fmadd(wv, s0 - e0, e0), at::vec::fmadd(wv, s1 - e1, e1));
    }
  } else if constexpr (std::is_same_v<E, double> && std::is_same_v<S, double>) {
    using DVec = Vectorized<double>;
    const DVec wv(w);
    for (; i + DVec::size() <= n; i += DVec::size()) {
      const DVec e = DVec::loadu(ema + i);
      at::vec::fmadd(wv, DVec::loadu(src + i) - e, e).store(ema + i);
    }
  }
  const Acc wa = static_cast<Acc>(w);
  for (; i < n; ++i) {  // tail, and pairs mixing fp64 with another dtype
    const Acc e = static_cast<Acc>(ema[i]);
    ema[i] = static_cast<E>(e + wa * (static_cast<Acc>(src[i]) - e));
  }
}

template <typename E>
void ema_span_src(const at::Tensor& ema, const at::Tensor& src, int64_t begin, int64_t n, double w) {
  E* e = ema.data_ptr<E>() + begin;
  switch (src.scalar_type()) {
    case at::kFloat: return ema_span(e, src.const_data_ptr<float>() + begin, n, w);
    case at::kDouble: return ema_span(e, src.const_data_ptr<double>() + begin, n, w);
    case at::kHalf: return ema_span(e, src.const_data_ptr<at::Half>() + begin, n, w);
    case at::kBFloat16: return ema_span(e, src.const_data_ptr<at::BFloat16>() + begin, n, w);
    default: TORCH_CHECK(false, "unreachable: dtype checked before");
  }
}

void ema_range(const at::Tensor& ema, const at::Tensor& src, int64_t begin, int64_t n, double w) {
  switch (ema.scalar_type()) {
    case at::kFloat: return ema_span_src<float>(ema, src, begin, n, w);
    case at::kDouble: return ema_span_src<double>(ema, src, begin, n, w);
    case at::kHalf: return ema_span_src<at::Half>(ema, src, begin, n, w);
    case at::kBFloat16: return ema_span_src<at::BFloat16>(ema, src, begin, n, w);
    default: TORCH_CHECK(false, "unreachable: dtype checked before");
  }
}

void ema_update_cpu(at::TensorList ema, at::TensorList src, at::ArrayRef<double> decay,
                    const std::optional<at::Tensor>& decay_tensor) {
  check_ema_args(ema, src, decay, decay_tensor, c10::DeviceType::CPU);
  const bool has_tensor = decay_tensor.has_value() && decay_tensor->defined();
  const double shared = has_tensor ? decay_tensor->item<double>() : 0.0;
  TORCH_CHECK_VALUE(!has_tensor || (shared >= 0.0 && shared <= 1.0), "decay_tensor must be in [0, 1]");
  const EmaWork work = split_ema_pairs(ema, src, has_tensor ? at::ArrayRef<double>() : decay);
  const std::vector<at::Tensor>& e = work.ema;
  const std::vector<at::Tensor>& s = work.src;

  std::vector<int64_t> offset(e.size() + 1, 0);  // prefix sums of numel
  for (size_t t = 0; t < e.size(); ++t) offset[t + 1] = offset[t] + e[t].numel();
  // A grain of 64K elements (~0.75 MB of traffic in fp32) amortizes the scheduling cost.
  constexpr int64_t kGrain = 1 << 16;
  at::parallel_for(0, offset.back(), kGrain, [&](int64_t lo, int64_t hi) {
    size_t t = std::upper_bound(offset.begin(), offset.end(), lo) - offset.begin() - 1;
    for (int64_t pos = lo; pos < hi; ++t) {
      const int64_t end = std::min(hi, offset[t + 1]);
      if (end > pos) {
        const double w = 1.0 - (has_tensor ? shared : work.decay[t]);
        ema_range(e[t], s[t], pos - offset[t], end - pos, w);
      }
      pos = std::max(pos, end);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace ntkcl_fast
