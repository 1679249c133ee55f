// Philox4x32-10 on 8 (AVX2) or 16 (AVX-512) counters per register: the DARE draws of csrc/cuda/philox.h.
//
// Why by hand: the 32 x 32 -> 64 multiplies are what the scalar loop spends its time on, and the
// compiler does not turn `uint64_t(a) * b` over eight lanes into vpmuludq: the scalar DARE kernel
// ran at ~3 ns per element, a fifth of the copy bandwidth. vpmuludq multiplies the even 32-bit
// lanes; the odd lanes are shifted down and multiplied by a second one, and blends put the low
// and high halves back in lane order. Two groups of eight counters go through the rounds
// together, so one group's multiplies run while the other's wait on theirs (latency ~5 cycles).
#pragma once
#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>

#include "../cuda/philox.h"

namespace ntkcl_fast {
namespace philox {
namespace avx2 {

struct Lanes {
  __m256i c0, c1, c2, c3;  // word w of the eight counters
};

inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // 64-bit products, lanes 0 2 4 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1 3 5 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

inline void round(Lanes& s, __m256i k0, __m256i k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  __m256i hi0, lo0, hi1, lo1;
  mul_hi_lo(s.c0, m0, hi0, lo0);
  mul_hi_lo(s.c2, m1, hi1, lo1);
  s.c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, s.c1), k0);
  s.c1 = lo1;
  s.c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, s.c3), k1);
  s.c3 = lo0;
}

// Counters (j0 + l, hi of it, key lo, key hi) for l = 0..7.
inline Lanes counters(uint64_t j0, uint64_t key) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int l = 0; l < 8; ++l) {
    lo[l] = static_cast<uint32_t>(j0 + l);
    hi[l] = static_cast<uint32_t>((j0 + l) >> 32);
  }
  return Lanes{_mm256_load_si256(reinterpret_cast<const __m256i*>(lo)),
               _mm256_load_si256(reinterpret_cast<const __m256i*>(hi)),
               _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key))),
               _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key >> 32)))};
}

// The 32 words of eight counters in element order (counter l's four words at 4l .. 4l + 3): a
// 4 x 8 transpose of the word registers.
inline void store_words(const Lanes& s, uint32_t* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(s.c0, s.c1), t1 = _mm256_unpackhi_epi32(s.c0, s.c1);
  const __m256i t2 = _mm256_unpacklo_epi32(s.c2, s.c3), t3 = _mm256_unpackhi_epi32(s.c2, s.c3);
  const __m256i r0 = _mm256_unpacklo_epi64(t0, t2), r1 = _mm256_unpackhi_epi64(t0, t2);  // counters 0 4, 1 5
  const __m256i r2 = _mm256_unpacklo_epi64(t1, t3), r3 = _mm256_unpackhi_epi64(t1, t3);  // counters 2 6, 3 7
  auto* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(r0, r1, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(r2, r3, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(r0, r1, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(r2, r3, 0x31));
}

// Draws of counters j0 .. j0 + 15 (elements 4 j0 .. 4 j0 + 63) into out[0, 64).
inline void draws16(uint64_t j0, uint64_t key, uint64_t seed, uint32_t* out) {
  Lanes a = counters(j0, key), b = counters(j0 + 8, key);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kW0;
      k1 += kW1;
    }
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int>(k0)), vk1 = _mm256_set1_epi32(static_cast<int>(k1));
    round(a, vk0, vk1);
    round(b, vk0, vk1);
  }
  store_words(a, out);
  store_words(b, out + 32);
}

}  // namespace avx2
}  // namespace philox
}  // namespace ntkcl_fast
#endif  // __AVX2__

// The same draws on sixteen counters per AVX-512 register, for CPUs that have it (checked at run
// time: the extension is built for AVX2). Twice the lanes per multiply of the AVX2 path.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>

#include "../cuda/philox.h"

#define NTKCL_AVX512 __attribute__((target("avx512f")))

namespace ntkcl_fast {
namespace philox {
namespace avx512 {

inline bool available() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

struct Lanes {
  __m512i c0, c1, c2, c3;
};

NTKCL_AVX512 inline void mul_hi_lo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  // 32-bit shuffles, not 64-bit shifts, move the halves: 10 % faster here (AMD EPYC), where
  // the same change slows the AVX2 path down
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(even, _MM_PERM_DDBB), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_shuffle_epi32(odd, _MM_PERM_CCAA));
}

NTKCL_AVX512 inline void round(Lanes& s, __m512i k0, __m512i k1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0)), m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  __m512i hi0, lo0, hi1, lo1;
  mul_hi_lo(s.c0, m0, hi0, lo0);
  mul_hi_lo(s.c2, m1, hi1, lo1);
  s.c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, s.c1), k0);
  s.c1 = lo1;
  s.c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, s.c3), k1);
  s.c3 = lo0;
}

NTKCL_AVX512 inline Lanes counters(uint64_t j0, uint64_t key) {
  alignas(64) uint32_t lo[16], hi[16];
  for (int l = 0; l < 16; ++l) {
    lo[l] = static_cast<uint32_t>(j0 + l);
    hi[l] = static_cast<uint32_t>((j0 + l) >> 32);
  }
  return Lanes{_mm512_load_si512(lo), _mm512_load_si512(hi),
               _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key))),
               _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key >> 32)))};
}

// 4 x 16 transpose: the unpacks leave counters 4b + {0, 1, 2, 3} in 128-bit block b of r0 .. r3;
// two rounds of block shuffles put the blocks in counter order.
NTKCL_AVX512 inline void store_words(const Lanes& s, uint32_t* out) {
  const __m512i t0 = _mm512_unpacklo_epi32(s.c0, s.c1), t1 = _mm512_unpackhi_epi32(s.c0, s.c1);
  const __m512i t2 = _mm512_unpacklo_epi32(s.c2, s.c3), t3 = _mm512_unpackhi_epi32(s.c2, s.c3);
  const __m512i r0 = _mm512_unpacklo_epi64(t0, t2), r1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i r2 = _mm512_unpacklo_epi64(t1, t3), r3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i s0 = _mm512_shuffle_i32x4(r0, r1, 0x44), s1 = _mm512_shuffle_i32x4(r2, r3, 0x44);
  const __m512i s2 = _mm512_shuffle_i32x4(r0, r1, 0xEE), s3 = _mm512_shuffle_i32x4(r2, r3, 0xEE);
  _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(s0, s1, 0x88));
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(s0, s1, 0xDD));
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(s2, s3, 0x88));
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(s2, s3, 0xDD));
}

// Draws of counters j0 .. j0 + 31 (elements 4 j0 .. 4 j0 + 127) into out[0, 128).
NTKCL_AVX512 inline void draws32(uint64_t j0, uint64_t key, uint64_t seed, uint32_t* out) {
  Lanes a = counters(j0, key), b = counters(j0 + 16, key);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kW0;
      k1 += kW1;
    }
    const __m512i vk0 = _mm512_set1_epi32(static_cast<int>(k0)), vk1 = _mm512_set1_epi32(static_cast<int>(k1));
    round(a, vk0, vk1);
    round(b, vk0, vk1);
  }
  store_words(a, out);
  store_words(b, out + 64);
}

}  // namespace avx512
}  // namespace philox
}  // namespace ntkcl_fast
#endif  // x86-64 GCC / Clang
