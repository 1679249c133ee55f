// The DARE Philox words of a run of flat indices, widest SIMD first (philox_simd.h), scalar
// counters (csrc/cuda/philox.h) for the rest: the same words as every other backend.
#pragma once
#include <cstdint>

#include "../cuda/philox.h"
#include "philox_simd.h"

namespace ntkcl_fast {
namespace cpu {

// u[0 .. n) = draws of flat indices [start, start + n), start a multiple of 4; u has room for n
// rounded up to a multiple of 4.
inline void fill_dare_draws(uint32_t* u, int64_t start, int64_t n, uint64_t key, uint64_t seed) {
  const uint64_t j0 = static_cast<uint64_t>(start) >> 2;
  const int64_t groups = (n + 3) / 4;
  int64_t g = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (philox::avx512::available()) {
    for (; g + 32 <= groups; g += 32) philox::avx512::draws32(j0 + g, key, seed, u + 4 * g);
  }
#endif
#if defined(__AVX2__)
  for (; g + 16 <= groups; g += 16) philox::avx2::draws16(j0 + g, key, seed, u + 4 * g);
#endif
  for (; g < groups; ++g) {
    const philox::U4 w = philox::dare_draws(j0 + g, key, seed);
    for (int l = 0; l < 4; ++l) u[4 * g + l] = w.v[l];
  }
}

}  // namespace cpu
}  // namespace ntkcl_fast
