// CUDA kernel of ntkcl_fast::merge_tensors (docs/API.md, "Model merging"), bit-identical to the
// CPU kernel (csrc/cpu/merge.cpp) and built as the Triton kernel (ntkcl_fast/triton/merge.py).
//
// The output comes from one fused pass: each thread owns kItems consecutive elements, reads base
// and each model once, sparsifies, rescales and weighs each delta, sums the terms in model order
// from +0, runs the TIES election and rounds once on store: (N + 2) x dtype bytes per element.
// Statistics come first, from read passes that write nothing of numel size:
// - ties' thresholds: a radix select over the magnitude keys (16-bit digits, 2 levels for fp32
//   math, 4 for fp64) with int64 atomics into per-model histograms (counts are exact, so atomic
//   order cannot change them), the digit search as ATen ops on the device, one host sync for the
//   result; when ties at a threshold must be split by index, a per-block tie count, its exclusive
//   scan, and in the fused pass a block-wide scan of the ties for each tie's index rank.
// - rescale="l1": per-chunk fp64 norms summed in the CPU kernel's order (16 lanes per 256-element
//   tile, lanes in order, tiles in order), the 16384-element chunks folded in order by one warp.
// Rounding as on the CPU: no FMA (products are __fmul_rn / __dmul_rn, which are never contracted,
// and the build passes --fmad=false), divisions correctly rounded, the store rounds to nearest
// even. The CPU's at::vec store writes some NaN bf16 payloads as 0xFFFF and this one writes
// CUDA's canonical NaN: NaN stays NaN in the same places, only its payload may differ.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../merge_checks.h"
#include "philox.h"

namespace ntkcl_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // consecutive elements per thread: one Philox call gives their 4 draws
constexpr int64_t kBlockElems = kThreads * kItems;
constexpr int kDigitBits = 16;
constexpr int64_t kBins = int64_t{1} << kDigitBits;
constexpr unsigned kNoBin = 0xFFFFFFFFu;
constexpr int64_t kNoKey = std::numeric_limits<int64_t>::max();  // above every magnitude key
// the CPU kernel's l1 summation order (csrc/cpu/multi_tensor.h kChunk, tile.h kTile, merge.cpp kLanes)
constexpr int64_t kL1Chunk = 16384;
constexpr int kL1Tile = 256, kL1Lanes = 16;
constexpr int kL1Tiles = kL1Chunk / kL1Tile;
constexpr int kL1Pairs = kL1Tiles * kL1Lanes;  // (tile, lane) partial sums per chunk
constexpr int kMaxGridY = 65535;

template <typename T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Weighted terms each thread keeps for the election; beyond them a term is computed again, by
// the same code, so the bits do not depend on the path. Fewer for fp64: 4 x 4 doubles of registers.
template <typename Acc>
constexpr int kMaxTerms = std::is_same_v<Acc, double> ? 4 : 8;

using TieScan = cub::BlockScan<int, kThreads>;
using TieSum = cub::BlockReduce<int, kThreads>;

// How model i's delta becomes its weighted term.
template <typename Acc>
struct ModelArgs {
  const void* data;
  uint64_t key;             // random: Philox key of the DARE draws (key + i, mod 2^64)
  uint64_t draw_threshold;  // random: keep u >= it (0: all, 2^32: none)
  uint64_t threshold;       // magnitude: keep key > it, and key == it while the tie rank < room
  int64_t room;             // kNoKey: every tie is kept
  int64_t tie_row;          // row of ties_before when the ties are split, else -1
  Acc weight;
  Acc divisor;  // rescale="density": kept / divisor (1 when density is 0: nothing is kept)
};

template <typename T>
struct MergeParams {
  using Acc = AccOf<T>;
  T* out;
  const T* base;  // null for linear
  const ModelArgs<Acc>* models;
  int64_t n_models, n, n_blocks;
  const int64_t* ties_before;  // [split models, n_blocks]: ties in earlier blocks
  const Acc* l1_scale;         // [n_models] for rescale="l1"
  uint64_t seed;
  int64_t offset;  // global flat index of element 0: DARE draws element j as offset + j
  Sparsify sparsify;
  Rescale rescale;
  bool linear, normalize;
  Acc lam;
  Acc divisor;  // guarded sum of weights
};

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// |d| as an integer ordered like the magnitude, every NaN one key above +inf (as the CPU kernel).
__device__ __forceinline__ uint64_t magnitude_key(float d) {
  const uint32_t bits = __float_as_uint(d) & 0x7FFFFFFFu;
  return bits > 0x7F800000u ? 0x7F800001ull : bits;
}
__device__ __forceinline__ uint64_t magnitude_key(double d) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(d)) & 0x7FFFFFFFFFFFFFFFull;
  return bits > 0x7FF0000000000000ull ? 0x7FF0000000000001ull : bits;
}

// First of this thread's kItems elements: blocks of kBlockElems, threads in index order.
__device__ __forceinline__ int64_t first_item() {
  return static_cast<int64_t>(blockIdx.x) * kBlockElems + static_cast<int64_t>(threadIdx.x) * kItems;
}

// A thread's kItems elements as one access (8 bytes for 2-byte dtypes, 16 for fp32, 2 x 16 for fp64).
template <typename T>
struct alignas(kItems * sizeof(T)) Items {
  T v[kItems];
};

// x[j] <- p[first + j] in the math type, 0 beyond n. One vector load when all kItems are in range
// and p is aligned to it (first is a multiple of kItems): the same for every thread of the launch
// but the last block's, so the branch does not diverge.
template <typename T>
__device__ __forceinline__ void load_items(const T* p, int64_t first, int64_t n, AccOf<T> (&x)[kItems]) {
  if (first + kItems <= n && reinterpret_cast<uintptr_t>(p) % sizeof(Items<T>) == 0) {
    const Items<T> v = *reinterpret_cast<const Items<T>*>(p + first);
#pragma unroll
    for (int j = 0; j < kItems; ++j) x[j] = static_cast<AccOf<T>>(v.v[j]);
    return;
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j) x[j] = first + j < n ? static_cast<AccOf<T>>(p[first + j]) : AccOf<T>(0);
}

// Word w of u by selects: an index only known at run time would put u in local memory.
__device__ __forceinline__ uint32_t word(const philox::U4& u, int w) {
  return w == 0 ? u.v[0] : w == 1 ? u.v[1] : w == 2 ? u.v[2] : u.v[3];
}

// The draws of global elements g0 .. g0 + 3: one Philox group when g0 is a multiple of 4, else
// the tail of one and the head of the next (the same shift for every thread of a launch).
__device__ __forceinline__ void draws_at(uint64_t g0, uint64_t key, uint64_t seed, uint32_t (&u)[kItems]) {
  const int shift = static_cast<int>(g0 & 3);
  const philox::U4 lo = philox::dare_draws(g0 >> 2, key, seed);
  if (shift == 0) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) u[j] = lo.v[j];
    return;
  }
  const philox::U4 hi = philox::dare_draws((g0 >> 2) + 1, key, seed);
#pragma unroll
  for (int j = 0; j < kItems; ++j) u[j] = shift + j < 4 ? word(lo, shift + j) : word(hi, shift + j - 4);
}

// d[j] <- m[first + j] - b[j].
template <typename T>
__device__ __forceinline__ void load_deltas(const void* m, int64_t first, int64_t n, const AccOf<T> (&b)[kItems],
                                            AccOf<T> (&d)[kItems]) {
  load_items(static_cast<const T*>(m), first, n, d);
#pragma unroll
  for (int j = 0; j < kItems; ++j) d[j] = d[j] - b[j];
}

// Zeroes the entries of d that model a's magnitude rule drops. Every thread of the block calls
// it with the same a: the tie scan is block-wide.
template <typename Acc>
__device__ __forceinline__ void keep_by_magnitude(const ModelArgs<Acc>& a, const int64_t* ties_before,
                                                  int64_t n_blocks, int64_t first, int64_t n,
                                                  typename TieScan::TempStorage& scan, Acc (&d)[kItems]) {
  uint64_t key[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) key[j] = magnitude_key(d[j]);
  if (a.tie_row < 0) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) d[j] = key[j] >= a.threshold ? d[j] : Acc(0);
    return;
  }
  // the ties, in index order, while the room lasts
  int tie[kItems], rank[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) tie[j] = first + j < n && key[j] == a.threshold;
  TieScan(scan).ExclusiveSum(tie, rank);
  __syncthreads();  // the scan's storage is used again by the next model
  const int64_t before = ties_before[a.tie_row * n_blocks + blockIdx.x];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const bool keep = key[j] > a.threshold || (tie[j] && before + rank[j] < a.room);
    d[j] = keep ? d[j] : Acc(0);
  }
}

// e <- model i's weighted term at this thread's elements.
template <typename T>
__device__ __forceinline__ void weighted_term(const MergeParams<T>& p, int64_t i, int64_t first,
                                              const AccOf<T> (&b)[kItems], typename TieScan::TempStorage& scan,
                                              AccOf<T> (&e)[kItems]) {
  using Acc = AccOf<T>;
  const ModelArgs<Acc> a = p.models[i];
  Acc t[kItems];
  if (p.linear) {
    load_items(static_cast<const T*>(a.data), first, p.n, t);
  } else {
    load_deltas<T>(a.data, first, p.n, b, t);
    if (p.sparsify == Sparsify::kMagnitude) {
      keep_by_magnitude(a, p.ties_before, p.n_blocks, first, p.n, scan, t);
    } else if (p.sparsify == Sparsify::kRandom) {
      uint32_t u[kItems];
      draws_at(static_cast<uint64_t>(first + p.offset), a.key, p.seed, u);
#pragma unroll
      for (int j = 0; j < kItems; ++j) t[j] = philox::kept(u[j], a.draw_threshold) ? t[j] : Acc(0);
      if (p.rescale == Rescale::kDensity) {
#pragma unroll
        for (int j = 0; j < kItems; ++j) t[j] = div_rn(t[j], a.divisor);
      } else if (p.rescale == Rescale::kL1) {
        const Acc scale = p.l1_scale[i];
#pragma unroll
        for (int j = 0; j < kItems; ++j) t[j] = mul_rn(t[j], scale);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j) e[j] = mul_rn(t[j], a.weight);
}

// The TIES election of one term: it takes part when its sign is the sign of the total (>= 0 is
// positive); zeros and NaN never take part, both comparisons are false for them.
template <typename Acc>
__device__ __forceinline__ void elect(const Acc (&e)[kItems], Acc w, const Acc (&total)[kItems],
                                      Acc (&mixed)[kItems], Acc (&div)[kItems]) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const bool take = total[j] >= Acc(0) ? e[j] > Acc(0) : e[j] < Acc(0);
    mixed[j] = mixed[j] + (take ? e[j] : Acc(0));
    div[j] = div[j] + (take ? w : Acc(0));
  }
}

template <typename T, bool kConsensus>
__global__ void __launch_bounds__(kThreads) merge_kernel(const MergeParams<T> p) {
  using Acc = AccOf<T>;
  constexpr int kKept = kConsensus ? kMaxTerms<Acc> : 1;
  __shared__ typename TieScan::TempStorage scan;
  const int64_t first = first_item();
  Acc b[kItems];
  if (p.linear) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) b[j] = Acc(0);
  } else {
    load_items(p.base, first, p.n, b);
  }
  Acc total[kItems], e[kItems], kept[kKept][kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) total[j] = Acc(0);
  // a compile-time index into `kept` keeps it in registers
#pragma unroll
  for (int i = 0; i < kKept; ++i) {
    if (i < p.n_models) {
      weighted_term(p, i, first, b, scan, e);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        total[j] = total[j] + e[j];
        if (kConsensus) kept[i][j] = e[j];
      }
    }
  }
  for (int64_t i = kKept; i < p.n_models; ++i) {
    weighted_term(p, i, first, b, scan, e);
#pragma unroll
    for (int j = 0; j < kItems; ++j) total[j] = total[j] + e[j];
  }
  Acc mixed[kItems];
  if (kConsensus) {
    Acc div[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) mixed[j] = div[j] = Acc(0);
#pragma unroll
    for (int i = 0; i < kKept; ++i) {
      if (i < p.n_models) elect(kept[i], p.models[i].weight, total, mixed, div);
    }
    for (int64_t i = kKept; i < p.n_models; ++i) {
      weighted_term(p, i, first, b, scan, e);
      elect(e, p.models[i].weight, total, mixed, div);
    }
    if (p.normalize) {
#pragma unroll
      for (int j = 0; j < kItems; ++j) mixed[j] = div_rn(mixed[j], div[j] == Acc(0) ? Acc(1) : div[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) mixed[j] = p.normalize ? div_rn(total[j], p.divisor) : total[j];
  }
  Items<T> res;  // rounded once, to nearest even
#pragma unroll
  for (int j = 0; j < kItems; ++j) res.v[j] = static_cast<T>(p.linear ? mixed[j] : b[j] + mul_rn(p.lam, mixed[j]));
  if (first + kItems <= p.n && reinterpret_cast<uintptr_t>(p.out) % sizeof(Items<T>) == 0) {
    *reinterpret_cast<Items<T>*>(p.out + first) = res;
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (first + j < p.n) p.out[first + j] = res.v[j];
    }
  }
}

// One count into bin of a per-model histogram, one atomic per distinct bin of the warp: at the
// top digit most keys of similar magnitudes share a bin. Every lane of the warp calls it.
__device__ __forceinline__ void count_in_bin(unsigned long long* hist, unsigned bin) {
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
  if (bin != kNoBin && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
    atomicAdd(hist + bin, static_cast<unsigned long long>(__popc(peers)));
  }
}

// hist[s, digit] += keys of model s whose higher digits equal prefix[s] (all keys at the top level).
template <typename T>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const T* base, const void* const* models,
                                                             const int64_t* prefix, unsigned long long* hist,
                                                             int64_t n, int64_t n_models, int shift, bool top_level) {
  using Acc = AccOf<T>;
  const int64_t i0 = first_item();
  Acc b[kItems], d[kItems];
  load_items(base, i0, n, b);
  for (int64_t s = 0; s < n_models; ++s) {
    load_deltas<T>(models[s], i0, n, b, d);
    const uint64_t want = top_level ? 0 : static_cast<uint64_t>(prefix[s]);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const uint64_t key = magnitude_key(d[j]);
      const bool counted = i0 + j < n && (top_level || (key >> (shift + kDigitBits)) == want);
      count_in_bin(hist + s * kBins, counted ? static_cast<unsigned>((key >> shift) & (kBins - 1)) : kNoBin);
    }
  }
}

// counts[s, block] = entries of model s in this block whose key is thresholds[s].
template <typename T>
__global__ void __launch_bounds__(kThreads) tie_count_kernel(const T* base, const void* const* models,
                                                             const int64_t* thresholds, int64_t* counts, int64_t n,
                                                             int64_t n_blocks, int64_t n_models) {
  using Acc = AccOf<T>;
  __shared__ typename TieSum::TempStorage storage;
  const int64_t i0 = first_item();
  Acc b[kItems], d[kItems];
  load_items(base, i0, n, b);
  for (int64_t s = 0; s < n_models; ++s) {
    load_deltas<T>(models[s], i0, n, b, d);
    int ties = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) ties += i0 + j < n && magnitude_key(d[j]) == static_cast<uint64_t>(thresholds[s]);
    const int total = TieSum(storage).Sum(ties);
    if (threadIdx.x == 0) counts[s * n_blocks + blockIdx.x] = total;
    __syncthreads();  // the reduction's storage is used again
  }
}

// full[s, chunk], kept[s, chunk]: this chunk's ||d_s||_1 and ||kept d_s||_1 in fp64, as the CPU
// kernel sums them: lane l of a tile adds its elements l, l + 16, ... in order, the lanes of a
// tile are added in order, then the tiles. Elements past the tensor's end add nothing (the CPU's
// last tile is short; the sums are >= +0 or NaN, so a missing +0 term changes nothing either).
template <typename T>
__global__ void __launch_bounds__(kThreads) l1_kernel(const T* base, const ModelArgs<AccOf<T>>* models,
                                                      double* full, double* kept, int64_t n, int64_t n_chunks,
                                                      int64_t n_models, uint64_t seed, int64_t offset) {
  using Acc = AccOf<T>;
  __shared__ double pair_full[kL1Pairs], pair_kept[kL1Pairs], tile_full[kL1Tiles], tile_kept[kL1Tiles];
  const int64_t c = blockIdx.x;
  for (int64_t s = blockIdx.y; s < n_models; s += gridDim.y) {
    const ModelArgs<Acc> a = models[s];
    const T* m = static_cast<const T*>(a.data);
    for (int pair = threadIdx.x; pair < kL1Pairs; pair += kThreads) {
      const int64_t start = c * kL1Chunk + (pair / kL1Lanes) * kL1Tile + pair % kL1Lanes;
      double f = 0.0, k = 0.0;
      for (int row = 0; row < kL1Tile / kL1Lanes; ++row) {
        const int64_t g = start + row * kL1Lanes;
        if (g >= n) break;
        const Acc d = static_cast<Acc>(m[g]) - static_cast<Acc>(base[g]);
        const double ad = fabs(static_cast<double>(d));
        const uint64_t global = static_cast<uint64_t>(g + offset);
        const philox::U4 u = philox::dare_draws(global >> 2, a.key, seed);
        const bool keep = philox::kept(word(u, static_cast<int>(global & 3)), a.draw_threshold);
        f = f + ad;
        k = k + (keep ? ad : 0.0);
      }
      pair_full[pair] = f;
      pair_kept[pair] = k;
    }
    __syncthreads();
    if (threadIdx.x < kL1Tiles) {
      double f = 0.0, k = 0.0;
      for (int l = 0; l < kL1Lanes; ++l) {
        f = f + pair_full[threadIdx.x * kL1Lanes + l];
        k = k + pair_kept[threadIdx.x * kL1Lanes + l];
      }
      tile_full[threadIdx.x] = f;
      tile_kept[threadIdx.x] = k;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double f = 0.0, k = 0.0;
      for (int t = 0; t < kL1Tiles; ++t) {
        f = f + tile_full[t];
        k = k + tile_kept[t];
      }
      full[s * n_chunks + c] = f;
      kept[s * n_chunks + c] = k;
    }
    __syncthreads();  // the shared sums are written again for the next model
  }
}

// scale[s] from model s's chunk sums folded in chunk order, as the CPU kernel: one warp per
// model loads 32 chunks at a time and every lane adds them one by one, in order.
template <typename Acc>
__global__ void l1_fold_kernel(const double* full, const double* kept, int64_t n_chunks, Acc* scale) {
  const int64_t s = blockIdx.x;
  const int lane = threadIdx.x;
  double f = 0.0, k = 0.0;
  for (int64_t c0 = 0; c0 < n_chunks; c0 += 32) {
    const int64_t c = c0 + lane;
    const double cf = c < n_chunks ? full[s * n_chunks + c] : 0.0;
    const double ck = c < n_chunks ? kept[s * n_chunks + c] : 0.0;
    const int64_t here = n_chunks - c0;  // chunks left: all 32 of this round count unless it is the last
    for (int l = 0; l < 32; ++l) {
      const double xf = __shfl_sync(0xFFFFFFFFu, cf, l), xk = __shfl_sync(0xFFFFFFFFu, ck, l);
      if (l < here) {
        f = f + xf;
        k = k + xk;
      }
    }
  }
  if (lane == 0) {
    // 1 when either norm is below 1e-7; a NaN norm is not below it and scales by NaN
    const Acc fa = static_cast<Acc>(f), ka = static_cast<Acc>(k);
    constexpr Acc kTiny = static_cast<Acc>(1e-7);
    scale[s] = fa < kTiny || ka < kTiny ? Acc(1) : div_rn(fa, ka);
  }
}

// ---------------------------------------------------------------- host side
// A device copy of v (bytes), through pinned memory so the copy does not wait for the stream.
template <typename V>
at::Tensor to_device(const std::vector<V>& v, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(v.size() * sizeof(V));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), v.data(), bytes);
  return host.to(device, at::kByte, /*non_blocking=*/true);
}

at::Tensor int64_to_device(const std::vector<int64_t>& v, const at::Device& device) {
  return to_device(v, device).view(at::kLong);
}

// Blocks of per_block elements over n > 0 elements: far below the 2^31 - 1 blocks a grid may have.
unsigned blocks_of(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

struct Selected {
  std::vector<int64_t> threshold, room, ties;  // per slot: k-th largest key, ties to keep, ties there are
};

// Per model of `models`, its k-th largest magnitude key (k = ks[s] in [1, n)), how many ties at
// that key it keeps and how many it has: a radix select from the top digit down, the digit search
// as ATen ops on the device, then one host sync for the result.
template <typename T>
Selected select_thresholds(const T* base, const std::vector<const void*>& models, const std::vector<int64_t>& ks,
                           int64_t n, const at::Device& device, cudaStream_t stream) {
  constexpr int kKeyBits = std::is_same_v<AccOf<T>, double> ? 64 : 32;
  const int64_t s = static_cast<int64_t>(models.size());
  const at::Tensor ptrs = to_device(models, device);
  at::Tensor need = int64_to_device(ks, device);
  at::Tensor prefix = at::zeros({s}, at::TensorOptions().dtype(at::kLong).device(device));
  at::Tensor ties;
  for (int level = 0; level < kKeyBits / kDigitBits; ++level) {
    const int shift = kKeyBits - kDigitBits * (level + 1);
    const at::Tensor hist = at::zeros({s, kBins}, prefix.options());
    histogram_kernel<T><<<blocks_of(n, kBlockElems), kThreads, 0, stream>>>(
        base, static_cast<const void* const*>(ptrs.const_data_ptr()), prefix.const_data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), n, s, shift, level == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor at_or_above = hist.flip({1}).cumsum(1).flip({1});  // keys with this digit or a higher one
    // the highest digit at or above which `need` keys lie (non-increasing in the digit: a prefix of true)
    const at::Tensor digit = ((at_or_above >= need.unsqueeze(1)).sum(1) - 1).clamp_min(0).unsqueeze(1);
    ties = hist.gather(1, digit).squeeze(1);
    need = need - (at_or_above.gather(1, digit).squeeze(1) - ties);
    prefix = prefix * kBins + digit.squeeze(1);
  }
  const at::Tensor host = at::stack({prefix, need, ties}).cpu();  // the one host sync
  const int64_t* h = host.const_data_ptr<int64_t>();
  return {std::vector<int64_t>(h, h + s), std::vector<int64_t>(h + s, h + 2 * s), std::vector<int64_t>(h + 2 * s, h + 3 * s)};
}

// Sets each model's magnitude threshold and tie room; returns ties_before [split models, blocks]
// (undefined when no ties are split): the ties of each split model in earlier blocks.
template <typename T>
at::Tensor plan_magnitudes(const T* base, at::TensorList models, at::ArrayRef<double> densities, int64_t n,
                           const at::Device& device, cudaStream_t stream, std::vector<ModelArgs<AccOf<T>>>& args) {
  std::vector<size_t> selected;
  std::vector<const void*> ptrs;
  std::vector<int64_t> ks;
  for (size_t i = 0; i < args.size(); ++i) {
    const double r = densities[i];
    if (r >= 1.0) continue;  // keep all: threshold 0
    const int64_t k = static_cast<int64_t>(r * static_cast<double>(n));  // floor, as int(r * numel)
    if (k <= 0) {
      args[i].threshold = static_cast<uint64_t>(kNoKey);
    } else if (k < n) {
      selected.push_back(i);
      ptrs.push_back(models[i].const_data_ptr());
      ks.push_back(k);
    }
  }
  if (selected.empty()) return {};
  const Selected sel = select_thresholds(base, ptrs, ks, n, device, stream);
  std::vector<const void*> split_ptrs;
  std::vector<int64_t> split_thresholds;
  for (size_t s = 0; s < selected.size(); ++s) {
    ModelArgs<AccOf<T>>& a = args[selected[s]];
    a.threshold = static_cast<uint64_t>(sel.threshold[s]);
    if (sel.room[s] == sel.ties[s]) continue;  // every tie is kept
    a.room = sel.room[s];
    a.tie_row = static_cast<int64_t>(split_ptrs.size());
    split_ptrs.push_back(ptrs[s]);
    split_thresholds.push_back(sel.threshold[s]);
  }
  if (split_ptrs.empty()) return {};
  const int64_t n_blocks = blocks_of(n, kBlockElems), n_split = static_cast<int64_t>(split_ptrs.size());
  const at::Tensor split_dev = to_device(split_ptrs, device), thresholds = int64_to_device(split_thresholds, device);
  const at::Tensor counts = at::empty({n_split, n_blocks}, thresholds.options());
  tie_count_kernel<T><<<n_blocks, kThreads, 0, stream>>>(base, static_cast<const void* const*>(split_dev.const_data_ptr()),
                                                         thresholds.const_data_ptr<int64_t>(),
                                                         counts.data_ptr<int64_t>(), n, n_blocks, n_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts.cumsum(1) - counts;  // exclusive scan in block order
}

// rescale="l1": each model's scale on the device, [n_models] of the math type.
template <typename T>
at::Tensor l1_scales(const T* base, const at::Tensor& args_dev, int64_t n_models, int64_t n, uint64_t seed,
                     int64_t offset, const at::Device& device, cudaStream_t stream) {
  using Acc = AccOf<T>;
  const int64_t n_chunks = blocks_of(n, kL1Chunk);
  const at::Tensor full = at::empty({n_models, n_chunks}, at::TensorOptions().dtype(at::kDouble).device(device));
  const at::Tensor kept = at::empty_like(full);
  const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(std::min<int64_t>(n_models, kMaxGridY)));
  l1_kernel<T><<<grid, kThreads, 0, stream>>>(base, static_cast<const ModelArgs<Acc>*>(args_dev.const_data_ptr()),
                                              full.data_ptr<double>(), kept.data_ptr<double>(), n, n_chunks, n_models,
                                              seed, offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor scale = at::empty({n_models}, full.options().dtype(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat));
  l1_fold_kernel<Acc><<<n_models, 32, 0, stream>>>(full.const_data_ptr<double>(), kept.const_data_ptr<double>(), n_chunks,
                                                  scale.data_ptr<Acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scale;
}

template <typename T>
void run_merge(const MergeCall& a, const at::Tensor& out) {
  using Acc = AccOf<T>;
  const int64_t n = out.numel(), n_models = static_cast<int64_t>(a.models.size());
  const at::Device device = out.device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  const T* base = a.base ? a.base->const_data_ptr<T>() : nullptr;
  std::vector<ModelArgs<Acc>> args(n_models);
  Acc divisor = 0;
  for (int64_t i = 0; i < n_models; ++i) {
    ModelArgs<Acc>& m = args[i];
    const double r = a.densities[i];
    m = ModelArgs<Acc>{a.models[i].const_data_ptr(), a.key + static_cast<uint64_t>(i), 0, 0, kNoKey, -1,
                       static_cast<Acc>(a.weights[i]), Acc(1)};
    if (a.method.sparsify == Sparsify::kRandom) {
      m.draw_threshold = std::min<uint64_t>(static_cast<uint64_t>((1.0 - r) * 4294967296.0), uint64_t{1} << 32);
      if (a.rescale == Rescale::kDensity && r > 0.0) m.divisor = static_cast<Acc>(r);
    }
    divisor += m.weight;  // a left fold in model order, as the CPU kernel
  }
  if (std::abs(divisor) < Acc(1e-8)) divisor = 1;
  at::Tensor ties_before;
  if (a.method.sparsify == Sparsify::kMagnitude) {
    ties_before = plan_magnitudes<T>(base, a.models, a.densities, n, device, stream, args);
  }
  const at::Tensor args_dev = to_device(args, device);
  const bool l1 = a.method.sparsify == Sparsify::kRandom && a.rescale == Rescale::kL1;
  const at::Tensor scale =
      l1 ? l1_scales<T>(base, args_dev, n_models, n, a.seed, a.offset, device, stream) : at::Tensor();
  const int64_t n_blocks = blocks_of(n, kBlockElems);
  const MergeParams<T> p{out.data_ptr<T>(),
                         base,
                         static_cast<const ModelArgs<Acc>*>(args_dev.const_data_ptr()),
                         n_models,
                         n,
                         n_blocks,
                         ties_before.defined() ? ties_before.const_data_ptr<int64_t>() : nullptr,
                         l1 ? scale.const_data_ptr<Acc>() : nullptr,
                         a.seed,
                         a.offset,
                         a.method.sparsify,
                         a.rescale,
                         a.method.linear,
                         a.normalize,
                         static_cast<Acc>(a.lam),
                         divisor};
  if (a.method.consensus) {
    merge_kernel<T, true><<<n_blocks, kThreads, 0, stream>>>(p);
  } else {
    merge_kernel<T, false><<<n_blocks, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run(const MergeCall& a, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "merge_tensors_cuda",
                                  [&] { run_merge<scalar_t>(a, out); });
}

using CudaOps = MergeOps<c10::DeviceType::CUDA, run>;

}  // namespace

TORCH_LIBRARY_IMPL(ntkcl_fast, CUDA, m) {
  m.impl("merge_tensors", &CudaOps::fresh);
  m.impl("merge_tensors_into_", &CudaOps::into);
}

}  // namespace ntkcl_fast
