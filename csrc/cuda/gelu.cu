// Bias + GELU on the GPU: forward and backward. Framework-free (launchers in kernels.cuh).
//
// Maths, elementwise on v = x + bias (bias broadcast over rows; v is formed in float):
//   "none": gelu(v) = v * Phi(v) = 0.5 v (1 + erf(v / sqrt 2)) = 0.5 v erfc(-v / sqrt 2)
//           gelu'(v) = Phi(v) + v phi(v),  phi(v) = exp(-v^2 / 2) / sqrt(2 pi)
//   "tanh": gelu(v) = 0.5 v (1 + tanh(u)) = v sigmoid(2u),  u = sqrt(2/pi) (v + 0.044715 v^3)
//           gelu'(v) = s + 2 v s (1 - s) u',  s = sigmoid(2u),  u' = sqrt(2/pi) (1 + 3*0.044715 v^2)
//   The sigmoid form avoids tanhf (which fast-math builds may approximate) and the cancellation
//   in 1 + tanh(u) for very negative u; erfc avoids it in 1 + erf; 1 - s is sigmoid(-2u).
// Backward: dx = dout * gelu'(v); dbias[j] = sum over rows of dx[:, j] (from the float dx).
//
// Launch configuration:
// - Forward: memory bound and elementwise. 256 threads per block, grid-stride over 16-byte packs
//   (8 halfs / 4 floats) when the row length and pointers allow it, else over single elements.
//   Blocks = ceil(packs / 256) capped at 4096 (grid-stride beyond): enough to fill any current GPU.
// - Backward: blocks of 32 x 8 threads. A block owns 32 columns (one coalesced warp-wide strip)
//   and a chunk of >= 64 rows (at most 256 chunks, see common.cuh); it writes dx and, when dbias
//   is wanted, one float partial per column into workspace[chunk, M] (the 8 row-threads are added
//   in shared memory in a fixed order). A second kernel adds the chunks per column in order, so
//   dbias is deterministic (no atomics). No dynamic shared memory.
//
// Compile-check: bash scripts/cuda_check.sh (nvcc for sm_80 and sm_90, registers and spills).
// Test (needs a GPU): pytest tests/test_cuda.py -k gelu.
#include "common.cuh"
#include "gelu_math.cuh"

#include <algorithm>

namespace fastattn {
namespace cuda {
namespace {

using namespace detail;

// out[i, j] = gelu(x[i, j] + bias[j]) over V-element packs (V = 1: scalar path).
template <typename T, int V>
__global__ void __launch_bounds__(256) bias_gelu_fwd_kernel(const T* __restrict__ x,
                                                            const float* __restrict__ bias,
                                                            T* __restrict__ out, int64_t packs,
                                                            int64_t M, bool tanh_approx) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j0 = (p * V) % M;  // V divides M on the vector path: a pack never wraps a row
    Pack<T, V> xv = reinterpret_cast<const Pack<T, V>*>(x)[p];
    Pack<T, V> ov;
    if (bias != nullptr) {
      const Pack<float, V> bv = *reinterpret_cast<const Pack<float, V>*>(bias + j0);
#pragma unroll
      for (int e = 0; e < V; ++e) ov.v[e] = from_float<T>(gelu(to_float(xv.v[e]) + bv.v[e], tanh_approx));
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) ov.v[e] = from_float<T>(gelu(to_float(xv.v[e]), tanh_approx));
    }
    reinterpret_cast<Pack<T, V>*>(out)[p] = ov;
  }
}

// dx = dout * gelu'(x + bias); per (row chunk, column) partial sums of dx into part (if non-null).
template <typename T>
__global__ void __launch_bounds__(kColTile* kColRowsY)
    bias_gelu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                         const float* __restrict__ bias, T* __restrict__ dx,
                         float* __restrict__ part, int64_t N, int64_t M, int64_t rows_per_chunk,
                         bool tanh_approx) {
  __shared__ float red[kColRowsY][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N;
  float acc = 0.f;
  if (j < M) {
    const float b = bias != nullptr ? bias[j] : 0.f;
    for (int64_t r = r0 + ty; r < r1; r += kColRowsY) {
      const int64_t idx = r * M + j;
      const float d = to_float(dout[idx]) * gelu_grad(to_float(x[idx]) + b, tanh_approx);
      dx[idx] = from_float<T>(d);
      acc += d;
    }
  }
  if (part == nullptr) return;  // uniform over the block
  red[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < M) {
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kColRowsY; ++y) s += red[y][tx];
    part[static_cast<int64_t>(blockIdx.y) * M + j] = s;
  }
}

template <typename T>
cudaError_t fwd_typed(const void* x_, const float* bias, void* out_, int64_t N, int64_t M,
                      bool tanh_approx, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_);
  T* out = static_cast<T*>(out_);
  constexpr int V = kVec<T>;
  const int64_t numel = N * M;
  if (numel == 0) return cudaSuccess;
  // With a bias, a pack must not straddle two rows (V | M) and the bias pack must be aligned.
  const bool vec = aligned(x, 16) && aligned(out, 16) &&
                   (bias == nullptr ? numel % V == 0
                                    : M % V == 0 && aligned(bias, sizeof(float) * V));
  const int64_t packs = vec ? numel / V : numel;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((packs + threads - 1) / threads, 4096));
  if (vec) {
    bias_gelu_fwd_kernel<T, V><<<blocks, threads, 0, stream>>>(x, bias, out, packs, M, tanh_approx);
  } else {
    bias_gelu_fwd_kernel<T, 1><<<blocks, threads, 0, stream>>>(x, bias, out, packs, M, tanh_approx);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* dout, const void* x, const float* bias, void* dx, float* dbias,
                      float* workspace, int64_t N, int64_t M, bool tanh_approx,
                      cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (N == 0) {
    return dbias != nullptr ? cudaMemsetAsync(dbias, 0, sizeof(float) * M, stream) : cudaSuccess;
  }
  const int64_t chunks = col_chunks(N);
  const dim3 block(kColTile, kColRowsY);
  const dim3 grid(static_cast<unsigned>((M + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  bias_gelu_bwd_kernel<T><<<grid, block, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(x), bias, static_cast<T*>(dx),
      dbias != nullptr ? workspace : nullptr, N, M, col_rows_per_chunk(N), tanh_approx);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dbias == nullptr) return err;
  return reduce_col_partials(workspace, dbias, chunks, M, stream);
}

}  // namespace

cudaError_t bias_gelu_fwd(DType dt, const void* x, const float* bias, void* out, int64_t N,
                          int64_t M, bool tanh_approx, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return fwd_typed<float>(x, bias, out, N, M, tanh_approx, stream);
    case DType::kFloat16: return fwd_typed<__half>(x, bias, out, N, M, tanh_approx, stream);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(x, bias, out, N, M, tanh_approx, stream);
  }
  return cudaErrorInvalidValue;
}

size_t bias_gelu_bwd_workspace(int64_t N, int64_t M, bool need_bias_grad) {
  return need_bias_grad && N > 0 ? static_cast<size_t>(detail::col_chunks(N) * M) : 0;
}

cudaError_t bias_gelu_bwd(DType dt, const void* dout, const void* x, const float* bias, void* dx,
                          float* dbias, float* workspace, int64_t N, int64_t M, bool tanh_approx,
                          cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32:
      return bwd_typed<float>(dout, x, bias, dx, dbias, workspace, N, M, tanh_approx, stream);
    case DType::kFloat16:
      return bwd_typed<__half>(dout, x, bias, dx, dbias, workspace, N, M, tanh_approx, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(dout, x, bias, dx, dbias, workspace, N, M, tanh_approx,
                                      stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastattn
