// RMSNorm, and residual-add fused with RMSNorm, on the GPU: forward and backward.
// Framework-free (launchers in kernels.cuh); contract of rms_norm_fwd / rms_norm_bwd in
// csrc/ops.cpp.
//
// Maths, per row of M elements (s = x + residual, rounded to x's dtype, when a residual is
// given, else s = x), with the scale c = weight + weight_offset formed by the caller:
//   rstd = 1 / sqrt(mean(s^2) + eps),  xhat = s * rstd,  out = r(xhat) * c
// where r() rounds to x's dtype when `cast` (LlamaRMSNorm's order), else is the identity.
// Backward, with g = dout * c:
//   dx = rstd * (g - xhat * mean(g * xhat))  (+ dsum, the gradient reaching s directly)
//   dweight = sum over rows of dout * r(xhat)
//
// Launch configuration (that of layernorm.cu, one reduction fewer):
// - Row kernels (forward, backward dx): 256 threads per block; a row is handled by one warp
//   (TPR = 32, 8 rows per block, shuffles only) when M <= 1024, else by the whole block
//   (TPR = 256, warp shuffles + 8 floats of shared memory, added in warp order). The row is
//   read twice with the same thread <-> element mapping; the second read hits L1/L2.
// - Loads and stores are 16-byte packs (8 halfs / 4 floats) when M and every pointer allow it,
//   else scalar. Accumulation is in float; the scale arrives as float.
// - dweight: a column kernel with 32 x 8 threads per block (a block owns 32 columns and a
//   chunk of >= 64 rows, <= 256 chunks) writes one float partial per (chunk, column) into a
//   workspace [chunks, M]; reduce_col_partials adds the chunks of each column in order:
//   deterministic, no atomics.
//
// Compile-check: bash scripts/cuda_check.sh.  Host emulation: bash tests/cuda_emu/run.sh rms.
// Test (needs a GPU): pytest tests/test_cuda.py -k rms_norm.
#include "common.cuh"

#include <initializer_list>

namespace fastattn {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

// Sum over the TPR threads of a row group (as in layernorm.cu). TPR == 32: one warp.
// TPR == kThreads: the block, added in warp order (deterministic); `red` holds 8 floats.
template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* red) {
  v = warp_sum(v);
  if constexpr (TPR == 32) {
    return v;
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < TPR / 32; ++w) s += red[w];
    __syncthreads();  // `red` is reused by the next reduction
    return s;
  }
}

template <typename T, int V>
__device__ __forceinline__ void load_v(const T* p, int64_t c, float (&f)[V]) {
  const Pack<T, V> pk = reinterpret_cast<const Pack<T, V>*>(p)[c];
#pragma unroll
  for (int e = 0; e < V; ++e) f[e] = to_float(pk.v[e]);
}
template <typename T, int V>
__device__ __forceinline__ void store_v(T* p, int64_t c, const float (&f)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int e = 0; e < V; ++e) pk.v[e] = from_float<T>(f[e]);
  reinterpret_cast<Pack<T, V>*>(p)[c] = pk;
}

// r(): x's dtype rounding of the Llama order (identity for float).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// One row per group of TPR threads; packs of V elements (V = 1: scalar path).
template <typename T, int TPR, int V>
__global__ void __launch_bounds__(kThreads)
    rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res,
                        const float* __restrict__ scale, T* __restrict__ out, T* __restrict__ sum,
                        float* __restrict__ rstd, int64_t N, int64_t M, float eps, bool cast) {
  __shared__ float red[kThreads / 32];
  constexpr int kRowsPerBlock = kThreads / TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  if (row >= N) return;  // TPR == 32: whole warps leave; TPR == kThreads: gridDim.x == N
  const int64_t packs = M / V;
  const T* xr = x + row * M;
  const T* src = xr;  // what is normalised: x, or the rounded sum x + residual
  float ss = 0.f;
  if (res != nullptr) {
    const T* rr = res + row * M;
    T* sr = sum + row * M;
    for (int64_t c = t; c < packs; c += TPR) {
      float a[V], r[V];
      load_v<T, V>(xr, c, a);
      load_v<T, V>(rr, c, r);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        a[e] = round_to<T>(a[e] + r[e]);  // round as the stored sum is rounded
        ss += a[e] * a[e];
      }
      store_v<T, V>(sr, c, a);
    }
    src = sr;  // re-read below by the same thread that wrote each pack
  } else {
    for (int64_t c = t; c < packs; c += TPR) {
      float a[V];
      load_v<T, V>(xr, c, a);
#pragma unroll
      for (int e = 0; e < V; ++e) ss += a[e] * a[e];
    }
  }
  const float rs = rsqrtf(row_sum<TPR>(ss, red) / static_cast<float>(M) + eps);
  T* orow = out + row * M;
  for (int64_t c = t; c < packs; c += TPR) {
    float a[V];
    load_v<T, V>(src, c, a);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      a[e] *= rs;
      if (cast) a[e] = round_to<T>(a[e]);
    }
    if (scale != nullptr) {
      float cv[V];
      load_v<float, V>(scale, c, cv);
#pragma unroll
      for (int e = 0; e < V; ++e) a[e] *= cv[e];
    }
    store_v<T, V>(orow, c, a);
  }
  if (t == 0) rstd[row] = rs;
}

// dx = rstd * (g - xhat * mean(g * xhat)) (+ dsum), one row per group of TPR threads.
template <typename T, int TPR, int V>
__global__ void __launch_bounds__(kThreads)
    rms_norm_bwd_dx_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                           const float* __restrict__ scale, const float* __restrict__ rstd,
                           const T* __restrict__ dsum, T* __restrict__ dx, int64_t N, int64_t M) {
  __shared__ float red[kThreads / 32];
  constexpr int kRowsPerBlock = kThreads / TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  if (row >= N) return;
  const int64_t packs = M / V;
  const float rs = rstd[row];
  const T* dyr = dout + row * M;
  const T* xr = x + row * M;
  float sgx = 0.f;
  for (int64_t c = t; c < packs; c += TPR) {
    float g[V], xv[V];
    load_v<T, V>(dyr, c, g);
    load_v<T, V>(xr, c, xv);
    if (scale != nullptr) {
      float cv[V];
      load_v<float, V>(scale, c, cv);
#pragma unroll
      for (int e = 0; e < V; ++e) g[e] *= cv[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e) sgx += g[e] * xv[e] * rs;
  }
  const float mgx = row_sum<TPR>(sgx, red) / static_cast<float>(M);
  T* dxr = dx + row * M;
  const T* dsr = dsum != nullptr ? dsum + row * M : nullptr;
  for (int64_t c = t; c < packs; c += TPR) {
    float g[V], xv[V], d[V];
    load_v<T, V>(dyr, c, g);
    load_v<T, V>(xr, c, xv);
    if (scale != nullptr) {
      float cv[V];
      load_v<float, V>(scale, c, cv);
#pragma unroll
      for (int e = 0; e < V; ++e) g[e] *= cv[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e) d[e] = (g[e] - xv[e] * rs * mgx) * rs;
    if (dsr != nullptr) {
      float ds[V];
      load_v<T, V>(dsr, c, ds);
#pragma unroll
      for (int e = 0; e < V; ++e) d[e] += ds[e];
    }
    store_v<T, V>(dxr, c, d);
  }
}

// Stage 1 of dweight: per (row chunk, column) partials of dout * r(xhat), into dw_part[chunks, M].
template <typename T>
__global__ void __launch_bounds__(kColTile* kColRowsY)
    rms_norm_bwd_dw_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                           const float* __restrict__ rstd, float* __restrict__ dw_part, int64_t N,
                           int64_t M, int64_t rows_per_chunk, bool cast) {
  __shared__ float red[kColRowsY][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N;
  float aw = 0.f;
  if (j < M) {
    for (int64_t r = r0 + ty; r < r1; r += kColRowsY) {
      float xh = to_float(x[r * M + j]) * rstd[r];
      if (cast) xh = round_to<T>(xh);
      aw += to_float(dout[r * M + j]) * xh;
    }
  }
  red[ty][tx] = aw;
  __syncthreads();
  if (ty == 0 && j < M) {
    float sw = 0.f;
#pragma unroll
    for (int y = 0; y < kColRowsY; ++y) sw += red[y][tx];
    dw_part[static_cast<int64_t>(blockIdx.y) * M + j] = sw;
  }
}

// Threads per row: a warp for rows up to 1024 elements, the whole block beyond.
inline int threads_per_row(int64_t M) { return M <= 1024 ? 32 : kThreads; }

template <int TPR>
unsigned row_blocks(int64_t N) {
  constexpr int64_t kRowsPerBlock = kThreads / TPR;
  return static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
}

template <typename T, int TPR, int V>
void launch_fwd(const T* x, const T* res, const float* scale, T* out, T* sum, float* rstd,
                int64_t N, int64_t M, float eps, bool cast, cudaStream_t stream) {
  rms_norm_fwd_kernel<T, TPR, V>
      <<<row_blocks<TPR>(N), kThreads, 0, stream>>>(x, res, scale, out, sum, rstd, N, M, eps, cast);
}

template <typename T, int TPR, int V>
void launch_bwd_dx(const T* dout, const T* x, const float* scale, const float* rstd,
                   const T* dsum, T* dx, int64_t N, int64_t M, cudaStream_t stream) {
  rms_norm_bwd_dx_kernel<T, TPR, V>
      <<<row_blocks<TPR>(N), kThreads, 0, stream>>>(dout, x, scale, rstd, dsum, dx, N, M);
}

// 16-byte packs need V | M and every row pointer (base + row * M) aligned: base aligned and
// V | M suffice. Float scale packs need V * 4-byte alignment.
template <typename T>
bool packs_fit(int64_t M, std::initializer_list<const void*> acts, const float* scale) {
  constexpr int V = kVec<T>;
  if (M % V != 0) return false;
  for (const void* p : acts)
    if (p != nullptr && !aligned(p, 16)) return false;
  return scale == nullptr || aligned(scale, sizeof(float) * V);
}

template <typename T>
cudaError_t fwd_typed(const void* x_, const void* res_, const float* scale, void* out_,
                      void* sum_, float* rstd, int64_t N, int64_t M, float eps, bool cast,
                      cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (M == 0) return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(x_);
  const T* res = static_cast<const T*>(res_);
  T* out = static_cast<T*>(out_);
  T* sum = static_cast<T*>(sum_);
  if ((res == nullptr) != (sum == nullptr)) return cudaErrorInvalidValue;
  constexpr int V = kVec<T>;
  const bool vec = packs_fit<T>(M, {x, res, out, sum}, scale);
  if (threads_per_row(M) == 32) {
    if (vec) launch_fwd<T, 32, V>(x, res, scale, out, sum, rstd, N, M, eps, cast, stream);
    else launch_fwd<T, 32, 1>(x, res, scale, out, sum, rstd, N, M, eps, cast, stream);
  } else {
    if (vec) launch_fwd<T, kThreads, V>(x, res, scale, out, sum, rstd, N, M, eps, cast, stream);
    else launch_fwd<T, kThreads, 1>(x, res, scale, out, sum, rstd, N, M, eps, cast, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* dout_, const void* x_, const float* scale, const float* rstd,
                      const void* dsum_, void* dx_, float* dw, float* workspace, int64_t N,
                      int64_t M, bool cast, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (N == 0) return dw != nullptr ? cudaMemsetAsync(dw, 0, sizeof(float) * M, stream) : cudaSuccess;
  const T* dout = static_cast<const T*>(dout_);
  const T* x = static_cast<const T*>(x_);
  const T* dsum = static_cast<const T*>(dsum_);
  T* dx = static_cast<T*>(dx_);
  constexpr int V = kVec<T>;
  const bool vec = packs_fit<T>(M, {dout, x, dsum, dx}, scale);
  if (threads_per_row(M) == 32) {
    if (vec) launch_bwd_dx<T, 32, V>(dout, x, scale, rstd, dsum, dx, N, M, stream);
    else launch_bwd_dx<T, 32, 1>(dout, x, scale, rstd, dsum, dx, N, M, stream);
  } else {
    if (vec) launch_bwd_dx<T, kThreads, V>(dout, x, scale, rstd, dsum, dx, N, M, stream);
    else launch_bwd_dx<T, kThreads, 1>(dout, x, scale, rstd, dsum, dx, N, M, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dw == nullptr) return err;

  const int64_t chunks = col_chunks(N);
  const dim3 block(kColTile, kColRowsY);
  const dim3 grid(static_cast<unsigned>((M + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  rms_norm_bwd_dw_kernel<T><<<grid, block, 0, stream>>>(dout, x, rstd, workspace, N, M,
                                                        col_rows_per_chunk(N), cast);
  err = cudaGetLastError();
  if (err == cudaSuccess) err = reduce_col_partials(workspace, dw, chunks, M, stream);
  return err;
}

}  // namespace

cudaError_t rms_norm_fwd(DType dt, const void* x, const void* residual, const float* scale,
                         void* out, void* sum, float* rstd, int64_t N, int64_t M, float eps,
                         bool cast_before_weight, cudaStream_t stream) {
  // float32: the rounding of the Llama order is the identity.
  switch (dt) {
    case DType::kFloat32:
      return fwd_typed<float>(x, residual, scale, out, sum, rstd, N, M, eps, false, stream);
    case DType::kFloat16:
      return fwd_typed<__half>(x, residual, scale, out, sum, rstd, N, M, eps, cast_before_weight,
                               stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(x, residual, scale, out, sum, rstd, N, M, eps,
                                      cast_before_weight, stream);
  }
  return cudaErrorInvalidValue;
}

size_t rms_norm_bwd_workspace(int64_t N, int64_t M, bool need_weight_grad) {
  if (N == 0 || !need_weight_grad) return 0;
  return static_cast<size_t>(detail::col_chunks(N) * M);
}

cudaError_t rms_norm_bwd(DType dt, const void* dout, const void* x, const float* scale,
                         const float* rstd, const void* dsum, void* dx, float* dweight,
                         float* workspace, int64_t N, int64_t M, bool cast_before_weight,
                         cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32:
      return bwd_typed<float>(dout, x, scale, rstd, dsum, dx, dweight, workspace, N, M, false,
                              stream);
    case DType::kFloat16:
      return bwd_typed<__half>(dout, x, scale, rstd, dsum, dx, dweight, workspace, N, M,
                               cast_before_weight, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(dout, x, scale, rstd, dsum, dx, dweight, workspace, N, M,
                                      cast_before_weight, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastattn
