// LayerNorm, and residual-add fused with LayerNorm, on the GPU: forward and backward.
// Framework-free (launchers in kernels.cuh); contract of layer_norm_fwd / layer_norm_bwd in
// csrc/ops.cpp.
//
// Maths, per row of M elements (s = x + residual, rounded to x's dtype, when a residual is
// given, else s = x):
//   mu = mean(s),  var = mean((s - mu)^2),  rstd = 1 / sqrt(var + eps)
//   xhat = (s - mu) * rstd,  out = xhat * weight + bias
// Backward, with g = dout * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))  (+ dsum, the gradient reaching s directly)
//   dweight = sum over rows of dout * xhat,  dbias = sum over rows of dout
// The mean's rounding: mu in float is off by up to ulp(mu) / 2 in every column, which on a row
// whose spread is small next to its mean (2 columns, a near-constant row) is a relative error
// of ulp(mu) / spread in xhat, the output and dweight, amplified further in dx (its formula
// assumes sum(xhat) == 0). The forward subtracts that error too, cm = mean(s - mu)
// (var = mean((s - mu)^2) - cm^2, xhat = (s - mu - cm) * rstd); the backward centres the
// recomputed xhat on its row mean (xc = xhat - mean(xhat), with mean(g * xc)), and dweight
// sums dout * xc (the dx kernel leaves each row's mean(xhat) in the workspace): as the CPU
// and Triton kernels.
//
// Launch configuration:
// - Row kernels (forward, backward dx): 256 threads per block. A row is handled by a group of
//   TPR threads: one warp (TPR = 32, 8 rows per block, shuffles only) when M <= 1024, else the
//   whole block (TPR = 256, one row per block, warp shuffles + 8 floats of shared memory).
//   The row is read three times (mean, variance, normalise) with the same thread <-> element
//   mapping; the 2nd and 3rd reads hit L1/L2 (a row is at most a few tens of KB). The
//   variance is two-pass (no E[x^2] - E[x]^2 cancellation).
// - Loads and stores are 16-byte packs (8 halfs / 4 floats) when M and every pointer allow it,
//   else scalar. Accumulation is in float; weight and bias arrive as float.
// - dweight / dbias: a column kernel with 32 x 8 threads per block; a block owns 32 columns
//   and a chunk of >= 64 rows (<= 256 chunks) and writes one float partial per column into a
//   workspace [chunks, M]; a second kernel adds the chunks of each column in order. This
//   re-reads dout and x once but is deterministic (no atomics) and keeps the dx kernel simple.
//
// Compile-check: bash scripts/cuda_check.sh.  Test (needs a GPU): pytest tests/test_cuda.py -k layer_norm.
#include "common.cuh"

#include <initializer_list>

namespace fastattn {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

// Sum over the TPR threads of a row group. TPR == 32: one warp. TPR == kThreads: the block,
// added in warp order (deterministic); `red` holds kThreads / 32 floats.
template <int TPR>
__device__ __forceinline__ float group_sum(float v, float* red) {
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
__device__ __forceinline__ void load_pack(const T* p, int64_t c, float (&f)[V]) {
  const Pack<T, V> pk = reinterpret_cast<const Pack<T, V>*>(p)[c];
#pragma unroll
  for (int e = 0; e < V; ++e) f[e] = to_float(pk.v[e]);
}
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, int64_t c, const float (&f)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int e = 0; e < V; ++e) pk.v[e] = from_float<T>(f[e]);
  reinterpret_cast<Pack<T, V>*>(p)[c] = pk;
}

// One row per group of TPR threads; packs of V elements (V = 1: scalar path).
template <typename T, int TPR, int V>
__global__ void __launch_bounds__(kThreads)
    layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res,
                          const float* __restrict__ w, const float* __restrict__ b,
                          T* __restrict__ out, T* __restrict__ sum, float* __restrict__ mean,
                          float* __restrict__ rstd, int64_t N, int64_t M, float eps) {
  __shared__ float red[kThreads / 32];
  constexpr int kRowsPerBlock = kThreads / TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  if (row >= N) return;  // TPR == 32: whole warps leave; TPR == kThreads: gridDim.x == N
  const int64_t packs = M / V;
  const float inv_m = 1.0f / static_cast<float>(M);
  const T* xr = x + row * M;
  const T* src = xr;  // what is normalised: x, or the rounded sum x + residual
  float acc = 0.f;
  if (res != nullptr) {
    const T* rr = res + row * M;
    T* sr = sum + row * M;
    for (int64_t c = t; c < packs; c += TPR) {
      float a[V], r[V];
      load_pack<T, V>(xr, c, a);
      load_pack<T, V>(rr, c, r);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        a[e] = to_float(from_float<T>(a[e] + r[e]));  // round as the stored sum is rounded
        acc += a[e];
      }
      store_pack<T, V>(sr, c, a);
    }
    src = sr;  // re-read below by the same thread that wrote each pack
  } else {
    for (int64_t c = t; c < packs; c += TPR) {
      float a[V];
      load_pack<T, V>(xr, c, a);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += a[e];
    }
  }
  const float mu = group_sum<TPR>(acc, red) * inv_m;
  float ss = 0.f, sd = 0.f;
  for (int64_t c = t; c < packs; c += TPR) {
    float a[V];
    load_pack<T, V>(src, c, a);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float d = a[e] - mu;
      ss += d * d;
      sd += d;
    }
  }
  // cm: the rounding error of mu (see the header); var = mean((s - mu)^2) - cm^2.
  const float cm = group_sum<TPR>(sd, red) * inv_m;
  const float rs = rsqrtf(fmaxf(group_sum<TPR>(ss, red) * inv_m - cm * cm, 0.f) + eps);
  T* orow = out + row * M;
  for (int64_t c = t; c < packs; c += TPR) {
    float a[V];
    load_pack<T, V>(src, c, a);
#pragma unroll
    for (int e = 0; e < V; ++e) a[e] = (a[e] - mu - cm) * rs;
    if (w != nullptr) {
      float wv[V];
      load_pack<float, V>(w, c, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) a[e] *= wv[e];
    }
    if (b != nullptr) {
      float bv[V];
      load_pack<float, V>(b, c, bv);
#pragma unroll
      for (int e = 0; e < V; ++e) a[e] += bv[e];
    }
    store_pack<T, V>(orow, c, a);
  }
  if (t == 0) {
    mean[row] = mu + cm;
    rstd[row] = rs;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dsum), one row per group of TPR threads.
template <typename T, int TPR, int V>
__global__ void __launch_bounds__(kThreads)
    layer_norm_bwd_dx_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                             const float* __restrict__ w, const float* __restrict__ mean,
                             const float* __restrict__ rstd, const T* __restrict__ dsum,
                             T* __restrict__ dx, float* __restrict__ xmean, int64_t N,
                             int64_t M) {
  __shared__ float red[kThreads / 32];
  constexpr int kRowsPerBlock = kThreads / TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  if (row >= N) return;
  const int64_t packs = M / V;
  const float inv_m = 1.0f / static_cast<float>(M);
  const float mu = mean[row], rs = rstd[row];
  const T* dyr = dout + row * M;
  const T* xr = x + row * M;
  float sg = 0.f, sgx = 0.f, sx = 0.f;
  for (int64_t c = t; c < packs; c += TPR) {
    float dy[V], xv[V];
    load_pack<T, V>(dyr, c, dy);
    load_pack<T, V>(xr, c, xv);
    if (w != nullptr) {
      float wv[V];
      load_pack<float, V>(w, c, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) dy[e] *= wv[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float xh = (xv[e] - mu) * rs;
      sg += dy[e];
      sx += xh;
      sgx += dy[e] * xh;
    }
  }
  const float mg = group_sum<TPR>(sg, red) * inv_m;
  const float mx = group_sum<TPR>(sx, red) * inv_m;
  const float mgx = group_sum<TPR>(sgx, red) * inv_m - mx * mg;
  if (xmean != nullptr && t == 0) xmean[row] = mx;  // for dweight's dout * (xhat - mx)
  T* dxr = dx + row * M;
  const T* dsr = dsum != nullptr ? dsum + row * M : nullptr;
  for (int64_t c = t; c < packs; c += TPR) {
    float dy[V], xv[V], d[V];
    load_pack<T, V>(dyr, c, dy);
    load_pack<T, V>(xr, c, xv);
    if (w != nullptr) {
      float wv[V];
      load_pack<float, V>(w, c, wv);
#pragma unroll
      for (int e = 0; e < V; ++e) dy[e] *= wv[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e) d[e] = (dy[e] - mg - ((xv[e] - mu) * rs - mx) * mgx) * rs;
    if (dsr != nullptr) {
      float ds[V];
      load_pack<T, V>(dsr, c, ds);
#pragma unroll
      for (int e = 0; e < V; ++e) d[e] += ds[e];
    }
    store_pack<T, V>(dxr, c, d);
  }
}

// Stage 1 of dweight / dbias: per (row chunk, column) partials of dout * xc and dout, where
// xc = xhat - xmean[row] (the row mean of xhat, written by the dx kernel: see the header).
// dw_part / db_part: [chunks, M] or null when not wanted (xmean is null when dw_part is).
template <typename T>
__global__ void __launch_bounds__(kColTile* kColRowsY)
    layer_norm_bwd_dwdb_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                               const float* __restrict__ mean, const float* __restrict__ rstd,
                               const float* __restrict__ xmean, float* __restrict__ dw_part,
                               float* __restrict__ db_part,
                               int64_t N, int64_t M, int64_t rows_per_chunk) {
  __shared__ float red_w[kColRowsY][kColTile];
  __shared__ float red_b[kColRowsY][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N;
  float aw = 0.f, ab = 0.f;
  if (j < M) {
    for (int64_t r = r0 + ty; r < r1; r += kColRowsY) {
      const float dy = to_float(dout[r * M + j]);
      if (dw_part != nullptr) aw += dy * ((to_float(x[r * M + j]) - mean[r]) * rstd[r] - xmean[r]);
      ab += dy;
    }
  }
  red_w[ty][tx] = aw;
  red_b[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && j < M) {
    float sw = 0.f, sb = 0.f;
#pragma unroll
    for (int y = 0; y < kColRowsY; ++y) {
      sw += red_w[y][tx];
      sb += red_b[y][tx];
    }
    const int64_t o = static_cast<int64_t>(blockIdx.y) * M + j;
    if (dw_part != nullptr) dw_part[o] = sw;
    if (db_part != nullptr) db_part[o] = sb;
  }
}

// Threads per row: a warp for rows up to 1024 elements, the whole block beyond.
inline int threads_per_row(int64_t M) { return M <= 1024 ? 32 : kThreads; }

template <typename T, int TPR, int V>
void launch_fwd(const T* x, const T* res, const float* w, const float* b, T* out, T* sum,
                float* mean, float* rstd, int64_t N, int64_t M, float eps, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / TPR;
  const unsigned blocks = static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
  layer_norm_fwd_kernel<T, TPR, V>
      <<<blocks, kThreads, 0, stream>>>(x, res, w, b, out, sum, mean, rstd, N, M, eps);
}

template <typename T, int TPR, int V>
void launch_bwd_dx(const T* dout, const T* x, const float* w, const float* mean,
                   const float* rstd, const T* dsum, T* dx, float* xmean, int64_t N, int64_t M,
                   cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / TPR;
  const unsigned blocks = static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
  layer_norm_bwd_dx_kernel<T, TPR, V>
      <<<blocks, kThreads, 0, stream>>>(dout, x, w, mean, rstd, dsum, dx, xmean, N, M);
}

// 16-byte packs need V | M and every row pointer (base + row * M) aligned: base aligned and
// V | M suffice. Float parameter packs need V * 4-byte alignment.
template <typename T>
bool can_vectorise(int64_t M, std::initializer_list<const void*> acts,
                   std::initializer_list<const float*> params) {
  constexpr int V = kVec<T>;
  if (M % V != 0) return false;
  for (const void* p : acts)
    if (p != nullptr && !aligned(p, 16)) return false;
  for (const float* p : params)
    if (p != nullptr && !aligned(p, sizeof(float) * V)) return false;
  return true;
}

template <typename T>
cudaError_t fwd_typed(const void* x_, const void* res_, const float* w, const float* b,
                      void* out_, void* sum_, float* mean, float* rstd, int64_t N, int64_t M,
                      float eps, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (M == 0) return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(x_);
  const T* res = static_cast<const T*>(res_);
  T* out = static_cast<T*>(out_);
  T* sum = static_cast<T*>(sum_);
  if ((res == nullptr) != (sum == nullptr)) return cudaErrorInvalidValue;
  constexpr int V = kVec<T>;
  const bool vec = can_vectorise<T>(M, {x, res, out, sum}, {w, b});
  if (threads_per_row(M) == 32) {
    if (vec) launch_fwd<T, 32, V>(x, res, w, b, out, sum, mean, rstd, N, M, eps, stream);
    else launch_fwd<T, 32, 1>(x, res, w, b, out, sum, mean, rstd, N, M, eps, stream);
  } else {
    if (vec) launch_fwd<T, kThreads, V>(x, res, w, b, out, sum, mean, rstd, N, M, eps, stream);
    else launch_fwd<T, kThreads, 1>(x, res, w, b, out, sum, mean, rstd, N, M, eps, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* dout_, const void* x_, const float* w, const float* mean,
                      const float* rstd, const void* dsum_, void* dx_, float* dw, float* db,
                      float* workspace, int64_t N, int64_t M, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  if (N == 0) {
    if (dw != nullptr) err = cudaMemsetAsync(dw, 0, sizeof(float) * M, stream);
    if (err == cudaSuccess && db != nullptr) err = cudaMemsetAsync(db, 0, sizeof(float) * M, stream);
    return err;
  }
  const T* dout = static_cast<const T*>(dout_);
  const T* x = static_cast<const T*>(x_);
  const T* dsum = static_cast<const T*>(dsum_);
  T* dx = static_cast<T*>(dx_);
  constexpr int V = kVec<T>;
  const bool vec = can_vectorise<T>(M, {dout, x, dsum, dx}, {w});
  // Workspace: [chunks, M] dweight partials, [chunks, M] dbias partials, then N row means of
  // xhat (dweight only), as layer_norm_bwd_workspace sizes it.
  const int64_t chunks = col_chunks(N);
  float* dw_part = dw != nullptr ? workspace : nullptr;
  float* db_part = db != nullptr ? workspace + (dw != nullptr ? chunks * M : 0) : nullptr;
  const int64_t grads = (dw != nullptr ? 1 : 0) + (db != nullptr ? 1 : 0);
  float* xmean = dw != nullptr ? workspace + grads * chunks * M : nullptr;
  if (threads_per_row(M) == 32) {
    if (vec) launch_bwd_dx<T, 32, V>(dout, x, w, mean, rstd, dsum, dx, xmean, N, M, stream);
    else launch_bwd_dx<T, 32, 1>(dout, x, w, mean, rstd, dsum, dx, xmean, N, M, stream);
  } else {
    if (vec) launch_bwd_dx<T, kThreads, V>(dout, x, w, mean, rstd, dsum, dx, xmean, N, M, stream);
    else launch_bwd_dx<T, kThreads, 1>(dout, x, w, mean, rstd, dsum, dx, xmean, N, M, stream);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess || (dw == nullptr && db == nullptr)) return err;

  const dim3 block(kColTile, kColRowsY);
  const dim3 grid(static_cast<unsigned>((M + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
  layer_norm_bwd_dwdb_kernel<T><<<grid, block, 0, stream>>>(
      dout, x, mean, rstd, xmean, dw_part, db_part, N, M, col_rows_per_chunk(N));
  err = cudaGetLastError();
  if (err == cudaSuccess && dw != nullptr) err = reduce_col_partials(dw_part, dw, chunks, M, stream);
  if (err == cudaSuccess && db != nullptr) err = reduce_col_partials(db_part, db, chunks, M, stream);
  return err;
}

}  // namespace

cudaError_t layer_norm_fwd(DType dt, const void* x, const void* residual, const float* weight,
                           const float* bias, void* out, void* sum, float* mean, float* rstd,
                           int64_t N, int64_t M, float eps, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32:
      return fwd_typed<float>(x, residual, weight, bias, out, sum, mean, rstd, N, M, eps, stream);
    case DType::kFloat16:
      return fwd_typed<__half>(x, residual, weight, bias, out, sum, mean, rstd, N, M, eps, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(x, residual, weight, bias, out, sum, mean, rstd, N, M, eps,
                                      stream);
  }
  return cudaErrorInvalidValue;
}

size_t layer_norm_bwd_workspace(int64_t N, int64_t M, bool need_weight_grad, bool need_bias_grad) {
  if (N == 0) return 0;
  const int64_t grads = (need_weight_grad ? 1 : 0) + (need_bias_grad ? 1 : 0);
  // The partials, and N row means of xhat when dweight is wanted (see bwd_typed).
  return static_cast<size_t>(grads * detail::col_chunks(N) * M + (need_weight_grad ? N : 0));
}

cudaError_t layer_norm_bwd(DType dt, const void* dout, const void* x, const float* weight,
                           const float* mean, const float* rstd, const void* dsum, void* dx,
                           float* dweight, float* dbias, float* workspace, int64_t N, int64_t M,
                           cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32:
      return bwd_typed<float>(dout, x, weight, mean, rstd, dsum, dx, dweight, dbias, workspace, N,
                              M, stream);
    case DType::kFloat16:
      return bwd_typed<__half>(dout, x, weight, mean, rstd, dsum, dx, dweight, dbias, workspace,
                               N, M, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(dout, x, weight, mean, rstd, dsum, dx, dweight, dbias,
                                      workspace, N, M, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastattn
