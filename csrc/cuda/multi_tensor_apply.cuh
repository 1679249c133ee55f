// One kernel launch for a whole list of tensors, in the style of apex/ATen multi_tensor_apply.
//
// The host packs every tensor's pointers, length, dtype codes and one per-tensor scalar into a
// table passed by value as a kernel parameter (__grid_constant__, so it is read in place from
// parameter memory, never copied to local memory). Each block owns one chunk of one tensor and
// finds its tensor by binary search over the chunk prefix sums, so there is no per-block
// table and nothing to copy host-to-device: the launch is CUDA-graph capturable.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstdint>
#include <vector>

namespace ntkcl_fast {
namespace mta {

// CUDA 12.1+ allows 32 KB of kernel parameters (Volta and newer), earlier toolkits 4 KB.
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxTensors = 384;
#else
constexpr int kMaxTensors = 72;
#endif
constexpr int64_t kChunk = 16384;  // elements per block, a multiple of every pack width (pack.cuh)
constexpr int kBlock = 256;

enum DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "multi_tensor_apply: unsupported dtype ", t);
  }
}

template <int Depth, typename Scalar>
struct Table {
  void* ptr[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  Scalar scalar[kMaxTensors];
  int32_t first_chunk[kMaxTensors + 1];  // tensor t owns blocks [first_chunk[t], first_chunk[t + 1])
  uint8_t dtype[Depth][kMaxTensors];
  int32_t count;
};

template <int Depth, typename Scalar>
__device__ __forceinline__ int tensor_of_block(const Table<Depth, Scalar>& table, int32_t block) {
  int lo = 0, hi = table.count - 1;  // last t with first_chunk[t] <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.first_chunk[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <int Depth, typename Scalar, typename Functor>
__global__ void __launch_bounds__(kBlock) multi_tensor_kernel(const __grid_constant__ Table<Depth, Scalar> table,
                                                              Functor functor) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  const int t = tensor_of_block(table, block);
  const int64_t begin = static_cast<int64_t>(block - table.first_chunk[t]) * kChunk;
  const int64_t end = begin + kChunk < table.numel[t] ? begin + kChunk : table.numel[t];
  functor(table, t, begin, end);
}

// Packs `lists` (Depth lists of equal length; list 0 is the one written) into as few tables as
// fit and calls launch(table, blocks, first_block) for each, on the lists' device and current
// stream; first_block counts the blocks of earlier tables. Empty tensors are skipped.
template <int Depth, typename Scalar, typename Launch>
void for_each_table(const std::array<at::TensorList, Depth>& lists, const std::vector<Scalar>& scalars,
                    const Launch& launch) {
  const at::TensorList& first = lists[0];
  if (first.empty()) return;
  const c10::cuda::CUDAGuard guard(first[0].device());
  Table<Depth, Scalar> table;
  table.count = 0;
  table.first_chunk[0] = 0;
  int64_t done = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    launch(table, table.first_chunk[table.count], done);
    done += table.first_chunk[table.count];
    table.count = 0;
  };
  constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t n = first[i].numel();
    if (n == 0) continue;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    if (table.count == kMaxTensors || table.first_chunk[table.count] + chunks > kMaxBlocks) flush();
    const int t = table.count;
    for (int d = 0; d < Depth; ++d) {
      table.ptr[d][t] = const_cast<void*>(lists[d][i].const_data_ptr());
      table.dtype[d][t] = dtype_code(lists[d][i].scalar_type());
    }
    table.numel[t] = n;
    table.scalar[t] = scalars.empty() ? Scalar(0) : scalars[i];
    table.first_chunk[t + 1] = static_cast<int32_t>(table.first_chunk[t] + chunks);
    table.count = t + 1;
  }
  flush();
}

// Launches `functor` over every chunk of every tensor of `lists`: one launch per table.
template <int Depth, typename Scalar, typename Functor>
void multi_tensor_apply(const std::array<at::TensorList, Depth>& lists, const std::vector<Scalar>& scalars,
                        const Functor& functor) {
  for_each_table<Depth, Scalar>(lists, scalars, [&](const Table<Depth, Scalar>& table, int32_t blocks, int64_t) {
    // the current stream of the lists' device: for_each_table has switched to it
    multi_tensor_kernel<Depth, Scalar, Functor>
        <<<blocks, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(table, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mta
}  // namespace ntkcl_fast

// ---------------------------------------------------------------------------------------------
// Deterministic reductions over a tensor list (L2 / EWC penalty values).
//
// Same chunk table as multi_tensor_apply; each block also gets its own slot of a `double`
// buffer, indexed by its chunk's position in the whole list (across table launches), and writes
// exactly one partial sum there: no float atomics, so the order of additions never depends on
// scheduling. reduce_partials then adds the slots in a fixed order in one block.

namespace ntkcl_fast {
namespace mta {

// Number of blocks (chunks) multi_tensor_apply_partials launches for `first`: the slot count.
inline int64_t chunk_count(at::TensorList first) {
  int64_t total = 0;
  for (const at::Tensor& t : first) total += (t.numel() + kChunk - 1) / kChunk;
  return total;
}

// Sum of `v` over the block, the same tree every time; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kBlock / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused by a following call
  return total;
}

template <int Depth, typename Scalar, typename Functor>
__global__ void __launch_bounds__(kBlock) multi_tensor_partials_kernel(const __grid_constant__ Table<Depth, Scalar> table,
                                                                       Functor functor, double* partials) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  const int t = tensor_of_block(table, block);
  const int64_t begin = static_cast<int64_t>(block - table.first_chunk[t]) * kChunk;
  const int64_t end = begin + kChunk < table.numel[t] ? begin + kChunk : table.numel[t];
  const double sum = block_sum(functor(table, t, begin, end));
  if (threadIdx.x == 0) partials[block] = sum;
}

// Launches `functor` (which returns each thread's partial sum) over `lists` and writes one sum per
// chunk to `partials`, which holds chunk_count(lists[0]) doubles.
template <int Depth, typename Scalar, typename Functor>
void multi_tensor_apply_partials(const std::array<at::TensorList, Depth>& lists, const std::vector<Scalar>& scalars,
                                 const Functor& functor, double* partials) {
  for_each_table<Depth, Scalar>(lists, scalars,
                                [&](const Table<Depth, Scalar>& table, int32_t blocks, int64_t first_block) {
    multi_tensor_partials_kernel<Depth, Scalar, Functor>
        <<<blocks, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(table, functor, partials + first_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// out[0] = float(scale * sum(partials[0, n))), added in a fixed order by one block. A template, so
// that every .cu including this header can instantiate it without a duplicate symbol.
template <int Block = kBlock>
__global__ void __launch_bounds__(Block) reduce_partials_kernel(const double* partials, int64_t n, double scale,
                                                                 float* out) {
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  const double total = block_sum(v);
  if (threadIdx.x == 0) *out = static_cast<float>(total * scale);
}

inline void reduce_partials(const double* partials, int64_t n, double scale, float* out, cudaStream_t stream) {
  reduce_partials_kernel<kBlock><<<1, kBlock, 0, stream>>>(partials, n, scale, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mta
}  // namespace ntkcl_fast
