// Small device helpers shared by the kernels in csrc/cuda/*.cu (no framework headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace fastattn {
namespace cuda {
namespace detail {

// ------------------------------------------------------------------ conversions
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements loaded / stored as one aligned vector (16 bytes for kVec<T> elements).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access

inline bool aligned(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// ------------------------------------------------------------------ reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ------------------------------------------------------------------ column sums, two stages
// Deterministic column sums of an [N, M] matrix computed on the fly: stage 1 (in the caller's
// kernel) writes one float partial per (row chunk, column) into part[chunks, M]; stage 2 below
// adds the chunks of each column in chunk order. No atomics, so the result depends on N and M
// only (not on the GPU or the scheduling).
constexpr int kColTile = 32;     // columns per block in stage 1: one warp-wide, coalesced
constexpr int kColRowsY = 8;     // threads along rows in stage 1 (block = 32 x 8)
constexpr int kMaxChunks = 256;  // bounds the partial buffer and stage 2's serial loop

inline int64_t col_chunks(int64_t N) {
  int64_t c = (N + 63) / 64;  // at least 64 rows per chunk
  if (c > kMaxChunks) c = kMaxChunks;
  return c < 1 ? 1 : c;
}
inline int64_t col_rows_per_chunk(int64_t N) {
  const int64_t c = col_chunks(N);
  return (N + c - 1) / c;
}

// out[j] = sum_{c < chunks} part[c * M + j], in order of c.
template <int kUnused = 0>
__global__ void reduce_col_partials_kernel(const float* __restrict__ part, float* __restrict__ out,
                                           int64_t chunks, int64_t M) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= M) return;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += part[c * M + j];
  out[j] = s;
}

inline cudaError_t reduce_col_partials(const float* part, float* out, int64_t chunks, int64_t M,
                                       cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((M + threads - 1) / threads);
  reduce_col_partials_kernel<<<blocks, threads, 0, stream>>>(part, out, chunks, M);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastattn
