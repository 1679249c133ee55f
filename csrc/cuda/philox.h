// Philox4x32-10 (Random123, Salmon et al. SC'11), written once for host and device.
//
// The CPU kernels (csrc/cpu/dare.cpp) and the CUDA kernels (csrc/cuda/dare.cu) both include this
// file, so the DARE keep rule is one piece of code; ntkcl_fast/random.py is its Python oracle and
// the tests compare every backend with it bit for bit.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NTKCL_HD __host__ __device__ __forceinline__
#else
#define NTKCL_HD inline
#endif

namespace ntkcl_fast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

struct U4 {
  uint32_t v[4];
};

NTKCL_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds; the key is bumped by the Weyl constants between rounds.
NTKCL_HD U4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return U4{{c0, c1, c2, c3}};
}

// The draws of elements 4j .. 4j+3 of the tensor with 64-bit key `key` under 64-bit `seed`:
// counter (j lo, j hi, key lo, key hi), Philox key (seed lo, seed hi).
NTKCL_HD U4 dare_draws(uint64_t j, uint64_t key, uint64_t seed) {
  return philox4x32_10(static_cast<uint32_t>(j), static_cast<uint32_t>(j >> 32), static_cast<uint32_t>(key),
                       static_cast<uint32_t>(key >> 32), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Kept iff u >= T(p) = min(floor(p * 2^32), 2^32): an integer compare, so every backend agrees.
NTKCL_HD bool kept(uint32_t u, uint64_t threshold) { return static_cast<uint64_t>(u) >= threshold; }

}  // namespace philox
}  // namespace ntkcl_fast
