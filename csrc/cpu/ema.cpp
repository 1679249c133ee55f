// CPU kernel of ntkcl_fast::ema_update_: one parallel pass over the whole tensor list
// (multi_tensor.h), math in fp32 on at::vec::Vectorized (fp64 when a side is fp64), rounded once
// on store. Minimum traffic: read ema and src, write ema, once each.
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "../ema_checks.h"
#include "multi_tensor.h"

namespace ntkcl_fast {
namespace {

using cpu::kTile;

// ema[begin, end) <- ema + w * (src - ema), w = 1 - decay.
template <typename Acc>
void ema_chunk(const at::Tensor& ema_t, const at::Tensor& src_t, int64_t begin, int64_t end, double decay) {
  using V = at::vec::Vectorized<Acc>;
  cpu::WriteTile<Acc> ema_tile(ema_t);
  cpu::ReadTile<Acc> src_tile(src_t);
  const Acc w = static_cast<Acc>(1.0 - decay);
  const V wv(w);
  for (int64_t pos = begin; pos < end; pos += kTile) {
    const int64_t n = std::min(kTile, end - pos);
    Acc* e = ema_tile.load(pos, n);
    const Acc* s = src_tile.read(pos, n);
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      const V ej = V::loadu(e + j);
      at::vec::fmadd(wv, V::loadu(s + j) - ej, ej).store(e + j);
    }
    for (; j < n; ++j) e[j] = e[j] + w * (s[j] - e[j]);
    ema_tile.store(pos, n);
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
  cpu::ChunkPlan(e).parallel_for([&](int64_t, const cpu::Chunk& c) {
    const double d = has_tensor ? shared : work.decay[c.tensor];
    cpu::with_acc(cpu::any_double({e, s}, c.tensor),
                  [&](auto acc) { ema_chunk<decltype(acc)>(e[c.tensor], s[c.tensor], c.begin, c.end, d); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace ntkcl_fast
